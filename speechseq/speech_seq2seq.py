"""``SpeechSeq2Seq``: the thin object over the pure functions in ``speechseq.model`` and a params pytree."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from speechseq import model as M
from speechseq.checkpoints import storage
from speechseq.config import (
    SpeechSeq2SeqConfig,
    check_memory,
    config_from_dict,
    decoder_config_from_hf,
    encoder_config_from_hf,
    make_seq2seq_config,
    read_json,
)
from speechseq.decoders.transformer import BOTH_IDS_AND_EMBEDS, check_embeds
from speechseq.decoding.layouts import DecodeLayouts
from speechseq.errors import InputError
from speechseq.hub import resolve
from speechseq.registry import family
from speechseq.checkpoints import table
from speechseq.checkpoints.hf import (
    init_std,
    load_part,
    log_report,
    save_hf,
    to_flat_numpy,
    to_tree,
)
from speechseq.checkpoints.readers import open_checkpoint

if TYPE_CHECKING:
    from speechseq.training.optim import OptimConfig


TOP_LEVEL_KEYS = ("decoder_start_token_id", "pad_token_id", "eos_token_id")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(dtype: Any) -> jnp.dtype:
    try:
        out = jnp.dtype(dtype)
    except TypeError:
        out = None
    if out is None or out.name not in COMPUTE_DTYPES:  # an integer compute dtype would silently truncate weights
        raise InputError(f"dtype: expected float32 or bfloat16 (or float16), got {dtype!r}")
    return out


class _ParamPlacement:
    """Where loaded params go: host / default device arrays (``mesh`` None), or straight into the shardings of a
    device mesh (``speechseq.sharding``, imported only then)."""

    def __init__(self, cfg: SpeechSeq2SeqConfig, mesh: Any, rules: Any):
        self.shardings: dict[str, Any] = {}
        if mesh is not None:
            from speechseq import sharding as S

            self.shardings = table.flatten(S.param_shardings(cfg, mesh, S.DEFAULT_RULES if rules is None else rules))

    def assemble(self, prefix: str = "") -> Callable | None:
        """``table.load``'s ``assemble`` for params under ``prefix`` ("encoder" for a warm start's encoder part)."""
        if not self.shardings:
            return None
        from speechseq import sharding as S

        cut = f"{prefix}/" if prefix else ""
        shardings = {p[len(cut):]: s for p, s in self.shardings.items() if p.startswith(cut)}
        return lambda r, names, tensors: S.read_shards(r, names, tensors, shardings)

    def target(self, weights: list[table.Rule]) -> Any:
        """``storage.restore_params``' target: the params' shapes in their shardings (None: as saved)."""
        if not self.shardings:
            return None
        return table.unflatten({p: jax.ShapeDtypeStruct(r.shape, np.float32, sharding=self.shardings[p])
                                for r in weights for p in r.paths})

    def __call__(self, made: Iterable[tuple[str, np.ndarray]]) -> dict[str, Any]:
        """Freshly made host params ((path, value) pairs, e.g. ``table.iter_params``), each placed in its sharding
        as it comes (kept as they are without a mesh)."""
        if not self.shardings:
            return dict(made)
        from speechseq import sharding as S

        return {p: S.put(v, self.shardings[p]) for p, v in made}


def _check_init_memory(rules: list[table.Rule], paths: Any = None) -> None:
    """Refuse, before allocating, fresh weights (all, or those at ``paths``) that cannot fit in memory: they are
    made in numpy float32 and copied into jax arrays, so they need twice their float32 size for a while."""
    wanted = None if paths is None else set(paths)
    sizes = [(math.prod(r.shape), p, r.shape) for r in rules for p in r.paths if wanted is None or p in wanted]
    if sizes:
        count, path, shape = max(sizes)
        check_memory(8 * sum(n for n, _, _ in sizes),
                     f"weights: {len(sizes)} freshly initialised weight(s) (largest {path} {list(shape)}, {count:,} "
                     "values)")


def _token_ids(x: Any, name: str, vocab: int) -> jax.Array | None:
    """Integer ids [batch, tokens] with every value in [0, vocab) (labels may also be -100); checked on the host
    before jit."""
    arr = _array(x, name, integer=True)
    if arr is not None:
        if arr.ndim != 2:
            raise InputError(f"{name}: expected rank 2 [batch, tokens], got shape {tuple(arr.shape)}")
        ids = np.asarray(arr)
        bad = (ids >= vocab) | ((ids < 0) & ~((ids == -100) & (name == "labels")))
        if bad.any():
            raise InputError(f"{name}: token id {int(ids[bad][0])} is outside the vocabulary [0, {vocab})")
    return arr


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


@jax.jit
def _all_binary(x: jax.Array) -> jax.Array:
    return ((x == 0) | (x == 1)).all()


def _array(x: Any, name: str, integer: bool = False, finite: bool = False, binary: bool = False
           ) -> jax.Array | None:
    """``x`` as a jax array, with one-line errors for what jit would reject obscurely (or not at all): text, ragged
    lists, non-numeric or (``integer``) non-integer values, no values, (``finite``) NaN or infinite values,
    which would otherwise decode to a row of garbage, and (``binary``: masks, bool, integer or float as transformers
    takes them) values other than 0 and 1, which the encoders would count as lengths."""
    if x is None:
        return None
    if isinstance(x, (str, bytes, os.PathLike)):
        hint = " (read audio files with speechseq.audio.load_audio)" if name == "input_values" else ""
        raise InputError(f"{name}: expected an array, got {type(x).__name__} {str(x)[:60]!r}{hint}")
    try:
        arr = x if isinstance(x, jax.Array) else np.asarray(x)  # a jax array stays put: a sharded batch stays sharded
    except ValueError:  # numpy refuses nested lists of different lengths
        raise InputError(f"{name}: ragged nested lists (rows of different lengths); pad them to one length "
                         "(with an attention mask)") from None
    if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == bool):
        raise InputError(f"{name}: expected a numeric array, got ragged or non-numeric data (dtype {arr.dtype})")
    if integer and not (jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == bool):
        raise InputError(f"{name}: expected integer values, got dtype {arr.dtype}")
    if arr.size == 0:
        raise InputError(f"{name}: is empty (shape {arr.shape})")
    if finite and jnp.issubdtype(arr.dtype, jnp.floating) and not isinstance(arr, jax.core.Tracer):
        if isinstance(arr, np.ndarray):
            bad = ~np.isfinite(arr)
            if bad.any():
                where = f" (row {int(np.argwhere(bad)[0][0])})" if arr.ndim == 2 else ""
                raise InputError(f"{name}: contains NaN or infinite values{where}")
        elif not bool(_all_finite(arr)):
            raise InputError(f"{name}: contains NaN or infinite values")
    if binary and arr.dtype != bool and not isinstance(arr, jax.core.Tracer):
        if isinstance(arr, np.ndarray):
            bad = (arr != 0) & (arr != 1)
            if bad.any():
                raise InputError(f"{name}: expected 0/1 values (1 attend, 0 padding), got {arr[bad][0]}")
        elif not bool(_all_binary(arr)):
            raise InputError(f"{name}: expected 0/1 values (1 attend, 0 padding), got others")
    return jnp.asarray(arr)


def _mask(x: Any, name: str) -> jax.Array | None:
    """A 0/1 attention mask (bool, integer or float) as a jax array, checked on the host."""
    return _array(x, name, binary=True)


def _check_batch(name: str, arr: jax.Array | None, batch: int | None) -> None:
    if arr is not None and batch is not None and arr.ndim >= 1 and arr.shape[0] != batch:
        raise InputError(f"{name}: batch {arr.shape[0]} does not match the audio batch {batch}")


class SpeechSeq2Seq:
    """A speech encoder joined to a text decoder. ``config`` is static; ``params`` is a pytree of jax arrays."""

    def __init__(self, config: SpeechSeq2SeqConfig, params: Mapping, dtype: Any = jnp.float32,
                 loading_info: table.LoadReport | None = None, generation_json: Mapping | None = None):
        self.config = config
        self.generation_json = None if generation_json is None else dict(generation_json)
        self.params = params
        self.dtype = _dtype(dtype)
        self.loading_info = loading_info or table.LoadReport([], [], [])
        self.decode_layouts = DecodeLayouts()  # the decoder weights in decode-step layout, made on first generate

    # -- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: SpeechSeq2SeqConfig | Mapping, seed: int = 0, dtype: Any = jnp.float32, *,
                    mesh: Any = None, rules: Any = None) -> "SpeechSeq2Seq":
        """Random init from a HF ``speech-encoder-decoder`` dict or a ``SpeechSeq2SeqConfig``. ``mesh`` / ``rules``:
        each param placed in its sharding as it is made (the same values), so the host never holds the whole model
        (``from_pretrained``'s)."""
        cfg = config_from_dict(config)
        weights = M.weight_rules(cfg)
        if mesh is None:
            _check_init_memory(weights)
        flat = _ParamPlacement(cfg, mesh, rules)(table.iter_params(weights, seed, init_std(cfg)))
        return cls(cfg, to_tree(flat), dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, seed: int = 0,
                        revision: str | None = None, mesh: Any = None, rules: Any = None) -> "SpeechSeq2Seq":
        """Load a HF ``SpeechEncoderDecoderModel`` checkpoint (directory or hub id; safetensors or .bin, sharded or
        not) without torch. Weights the checkpoint lacks are initialised from ``seed`` and reported.

        ``mesh`` (``sharding.make_mesh``): every param is born in its sharding (``sharding.param_shardings(cfg,
        mesh, rules)``; ``rules`` default ``sharding.DEFAULT_RULES``), so no device ever holds the whole model: a
        Hugging Face checkpoint is read one tensor (one layer's weight) at a time and each process keeps only its
        devices' slices (``sharding.read_shards``), a speechseq checkpoint is restored by orbax straight into the
        shardings. In a multi-process run every process calls it."""
        path = resolve(name_or_path, revision)
        cfg = config_from_dict(read_json(path / "config.json"), str(path / "config.json"))
        weights = M.weight_rules(cfg)
        place = _ParamPlacement(cfg, mesh, rules)
        if storage.is_speechseq(path):  # orbax params written by `speechseq convert`
            flat = table.flatten(storage.restore_params(path, place.target(weights)))
            needed = [p for r in weights for p in r.paths]
            report = table.LoadReport([p for p in needed if p not in flat], sorted(set(flat) - set(needed)),
                                      [p for p in needed if p not in flat])
        else:
            with open_checkpoint(path) as ckpt:
                flat, report = table.load(weights, ckpt, where=str(path), assemble=place.assemble())
        log_report(report, str(path))
        _check_init_memory(weights, report.missing_paths)
        flat.update(place(table.iter_params(weights, seed, init_std(cfg), only=report.missing_paths)))
        gen_path = path / "generation_config.json"
        gen_json = read_json(gen_path) if gen_path.exists() else None
        return cls(cfg, to_tree(flat), dtype, report, gen_json)

    @classmethod
    def from_encoder_decoder_pretrained(cls, encoder: str | os.PathLike, decoder: str | os.PathLike, *,
                                        dtype: Any = jnp.float32, seed: int = 0, mesh: Any = None, rules: Any = None,
                                        **kwargs: Any) -> "SpeechSeq2Seq":
        """Warm start from a speech encoder checkpoint and a text decoder checkpoint.

        ``encoder_*`` / ``decoder_*`` keyword arguments update the sub-configs under the family's HF names
        (``encoder_add_adapter=True``, ``decoder_dropout=0.1`` for BART, ``decoder_resid_pdrop=0.1`` for GPT-2) or
        the typed config's names (``decoder_hidden_dropout=0.1`` for any decoder); ``decoder_start_token_id``,
        ``pad_token_id`` and ``eos_token_id`` set the top-level fields (the start token defaults to the decoder's
        ``bos_token_id``).
        The decoder becomes a decoder with cross-attention; its cross-attention (and ``enc_to_dec_proj``, and any
        adapter the encoder checkpoint lacks) are freshly initialised and listed in ``loading_info.missing``.
        ``mesh`` / ``rules``: every param born in its sharding, as ``from_pretrained``'s.
        """
        top = {k: kwargs.pop(k) for k in TOP_LEVEL_KEYS if k in kwargs}  # "decoder_start_token_id" is not a decoder_*
        unknown = [k for k in kwargs if not k.startswith(("encoder_", "decoder_"))]
        if unknown:
            raise InputError(f"from_encoder_decoder_pretrained: unknown keyword argument(s) {unknown}; use encoder_* / "
                             f"decoder_* for the sub-configs or one of {list(TOP_LEVEL_KEYS)}")
        parts = {}
        for role, src in (("encoder", encoder), ("decoder", decoder)):
            path = resolve(src)
            hf = read_json(path / "config.json")
            overrides = {k[len(role) + 1:]: v for k, v in kwargs.items() if k.startswith(role + "_")}
            fam = family({**hf, **overrides}.get("model_type"), role, str(path / "config.json"))
            # typed names -> this family's HF names (not a shifted field: its HF value is not the typed one)
            hf_key = {f.attr: f.key for f in fam.fields if f.transform is None}
            hf.update({hf_key.get(k, k): v for k, v in overrides.items()})
            if role == "decoder":
                hf.update(is_decoder=True, add_cross_attention=True)
            else:
                hf.update(is_decoder=False, add_cross_attention=False)
            parse = encoder_config_from_hf if role == "encoder" else decoder_config_from_hf
            parts[role] = (path, parse(hf, str(path / "config.json")))
        cfg = make_seq2seq_config(parts["encoder"][1], parts["decoder"][1],
                                  {"model_type": "speech-encoder-decoder", "is_encoder_decoder": True, **top})
        place = _ParamPlacement(cfg, mesh, rules)
        flat: dict[str, Any] = {}
        unexpected: list[str] = []
        for role, (path, sub) in parts.items():
            with open_checkpoint(path) as ckpt:
                part, report = load_part(family(sub.model_type, role), sub, ckpt, str(path), place.assemble(role))
            flat.update({f"{role}/{k}": v for k, v in part.items()})
            unexpected += [f"{role}.{n}" for n in report.unexpected]
        weights = M.weight_rules(cfg)
        fresh = [p for r in weights for p in r.paths if p not in flat]
        _check_init_memory(weights, fresh)
        flat.update(place(table.iter_params(weights, seed, init_std(cfg), only=fresh)))
        fresh_set = set(fresh)  # named as the joined model names them (not as the standalone sources did)
        missing = [r.names(i)[0] for r in weights if fresh_set.intersection(r.paths) for i in range(r.num_layers)]
        report = table.LoadReport(missing, unexpected, fresh)
        log_report(report, "from_encoder_decoder_pretrained", " (train them before use)")
        return cls(cfg, to_tree(flat), dtype, report)

    # -- compute ---------------------------------------------------------------------------------------------------

    def _inputs(self, input_values: Any, input_features: Any, required: bool = True,
                inputs: Any = None) -> jax.Array | None:
        """The encoder's input as an array: ``inputs`` (whatever the encoder reads), or ``input_values`` (audio
        [B, N]) or ``input_features`` ([B, S, F]) by the kind the encoder reads, checked on the host; one line for
        the other kind, the input given twice, or (``required``) none. Errors name the input by the kind the
        encoder reads, however it came (the first argument was ``input_values`` before it was ``inputs``)."""
        kind = M.input_kind(self.config)
        x = _array(M.encoder_input(self.config, input_values, input_features, inputs), kind.name, finite=True)
        if x is None and required:
            raise InputError(f"{kind.name}: required ({kind.description})")
        if x is not None and x.ndim != kind.rank:  # the batch is read before the encoder's own checks run
            raise InputError(f"{kind.name}: expected rank {kind.rank}: {kind.description}, got shape "
                             f"{tuple(x.shape)}")
        return x

    def encode(self, input_values: Any = None, attention_mask: Any = None, *, input_features: Any = None,
               output_hidden_states: bool = False, output_attentions: bool = False) -> M.EncoderOutput:
        """Audio [B, N] (or ``input_features`` [B, S, F], for an encoder that reads features) -> EncoderOutput
        (frames [B, S, E], frame mask [B, S]; with ``output_hidden_states`` / ``output_attentions`` its
        ``hidden_states`` / ``attentions`` tuples, as transformers' encoder returns them)."""
        return M.encode_jit(self.config, self.params, self._inputs(input_values, input_features),
                            _mask(attention_mask, "attention_mask"), self.dtype,
                            output_hidden_states=_flag(output_hidden_states, "output_hidden_states"),
                            output_attentions=_flag(output_attentions, "output_attentions"))

    def __call__(self, inputs: Any = None, attention_mask: Any = None, decoder_input_ids: Any = None,
                 decoder_attention_mask: Any = None, labels: Any = None,
                 encoder_outputs: M.EncoderOutput | tuple | None = None, input_features: Any = None,
                 rng: Any = None, *, input_values: Any = None, decoder_inputs_embeds: Any = None,
                 output_hidden_states: bool = False, output_attentions: bool = False) -> M.Seq2SeqOutput:
        """Logits [B, T, V] (and the loss when ``labels`` [B, T] are given, -100 ignored) with transformers'
        keywords. The encoder reads ``inputs`` (transformers' first argument: audio [B, N] or features [B, S, F],
        whichever it takes), or the same by name, audio ``input_values`` [B, N] or ``input_features`` [B, S, F],
        or ``encoder_outputs``. The decoder reads ``decoder_input_ids`` [B, T], or ``decoder_inputs_embeds``
        [B, T, D] in their place (positions, token type and norm are added as the decoder family in transformers
        adds them), or else ``labels`` shifted right. Masks (``attention_mask`` [B, N], ``decoder_attention_mask``
        [B, T]) may be bool, integer or float, with 0/1 values. ``rng``: a ``jax.random`` key turns on dropout,
        LayerDrop and SpecAugment (training mode); None is eval mode. ``output_hidden_states`` /
        ``output_attentions``: transformers' per-layer outputs as well (``Seq2SeqOutput``'s ``encoder_*``,
        ``decoder_*`` and ``cross_attentions`` tuples), computed only when asked."""
        x = self._inputs(input_values, input_features, required=False, inputs=inputs)
        if x is None and encoder_outputs is None:
            raise InputError(f"{M.input_kind(self.config).name}: required unless encoder_outputs are given")
        vocab = self.config.decoder.vocab_size
        ids = _token_ids(decoder_input_ids, "decoder_input_ids", vocab)
        embeds = _array(decoder_inputs_embeds, "decoder_inputs_embeds", finite=True)
        if ids is not None and embeds is not None:
            raise InputError(BOTH_IDS_AND_EMBEDS)
        if embeds is not None:
            check_embeds(self.config.decoder, embeds)
        labels = _token_ids(labels, "labels", vocab)
        ids_mask = _mask(decoder_attention_mask, "decoder_attention_mask")
        # shapes that jit would only report as a broadcasting error, or under another argument's name
        frames = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else None
        batch = x.shape[0] if x is not None else (getattr(frames, "shape", None) or (None,))[0]
        _check_batch("decoder_input_ids", ids, batch)
        _check_batch("decoder_inputs_embeds", embeds, batch)
        _check_batch("labels", labels, batch)
        given = (("decoder_input_ids", tuple(ids.shape)) if ids is not None
                 else ("decoder_inputs_embeds", tuple(embeds.shape[:2])) if embeds is not None else None)
        if given is not None and labels is not None and tuple(labels.shape) != given[1]:
            raise InputError(f"labels: shape {tuple(labels.shape)} does not match {given[0]} {given[1]}")
        tokens = given or (("labels", tuple(labels.shape)) if labels is not None else None)
        if ids_mask is not None and tokens is not None and tuple(ids_mask.shape) != tokens[1]:
            raise InputError(f"decoder_attention_mask: expected shape {tokens[1]} like {tokens[0]}, got "
                             f"{tuple(ids_mask.shape)}")
        return M.forward_jit(self.config, self.params, x, attention_mask=_mask(attention_mask, "attention_mask"),
                             decoder_input_ids=ids, decoder_attention_mask=ids_mask, labels=labels,
                             encoder_outputs=encoder_outputs, dtype=self.dtype, rng=rng,
                             decoder_inputs_embeds=embeds,
                             output_hidden_states=_flag(output_hidden_states, "output_hidden_states"),
                             output_attentions=_flag(output_attentions, "output_attentions"))

    # -- export ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """HF tensors: PyTorch names and layouts of ``SpeechEncoderDecoderModel``."""
        return table.save(M.weight_rules(self.config), to_flat_numpy(self.params))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that ``transformers.SpeechEncoderDecoderModel`` loads."""
        extra = None if self.generation_json is None else {"generation_config.json": self.generation_json}
        save_hf(directory, self.config.to_dict(), self.state_dict(), extra)

    @property
    def encoder(self) -> "ModelPart":
        """The speech encoder alone (sharing these params): ``model.encoder(inputs, attention_mask)`` ->
        EncoderOutput (frames before ``enc_to_dec_proj``); ``save_pretrained`` writes a standalone checkpoint of
        its family (``Wav2Vec2Model``'s layout, which ``transformers.AutoModel`` loads)."""
        return ModelPart(self, "encoder")

    @property
    def decoder(self) -> "ModelPart":
        """The text decoder alone (sharing these params): ``model.decoder(input_ids, encoder_hidden_states,
        encoder_attention_mask, attention_mask)`` -> logits; ``save_pretrained`` writes a standalone checkpoint of its
        causal-LM class (``BertLMHeadModel``'s, with its cross-attention: ``AutoModelForCausalLM`` loads it)."""
        return ModelPart(self, "decoder")

    def astype(self, dtype: Any) -> "SpeechSeq2Seq":
        """The same params computing in another dtype."""
        new = copy.copy(self)
        new.dtype = _dtype(dtype)
        new.decode_layouts = DecodeLayouts()  # its own: layouts follow the dtype
        return new

    # -- training --------------------------------------------------------------------------------------------------

    def freeze_feature_encoder(self, optim: "OptimConfig | None" = None) -> "OptimConfig":
        """transformers' ``freeze_feature_encoder``, functionally: ``optim`` (default ``OptimConfig()``) with
        "feature_encoder" added to its ``freeze``, everything else kept.

        Params here are plain arrays with no ``requires_grad``; what training updates is decided in one place, the
        optimizer config's ``freeze`` (``speechseq.training.optim``). ``training.init_state`` and
        ``make_train_step`` given the returned config keep the encoder's convolutional feature encoder fixed (no
        gradient, no optimizer state), the parameters transformers' method freezes; in a training config file the
        same is ``[optim] freeze = ["feature_encoder"]``. The model itself is not changed, so nothing here has to
        be remembered or undone.

            optim = model.freeze_feature_encoder(training.OptimConfig(learning_rate=3e-4))
            state = training.init_state(model.config, model.params, optim, seed=0)

        A one-line ``ConfigError`` when the encoder has no feature encoder (Speech2Text's filterbank encoder, which
        has no such method in transformers either)."""
        from speechseq.training.optim import OptimConfig, partition

        optim = OptimConfig() if optim is None else optim
        partition(self.params, ("feature_encoder",))  # refuses an encoder without one
        if "feature_encoder" in optim.freeze or "all_but_adapter_cross_attention" in optim.freeze:
            return optim  # frozen already
        return dataclasses.replace(optim, freeze=(*optim.freeze, "feature_encoder"))

    # -- decoding --------------------------------------------------------------------------------------------------

    def generation_config(self, *, batch: int | None = None, device: Any = None, **kwargs: Any):
        """The static ``GenerationConfig`` for these keywords over the checkpoint's defaults (validated: settings,
        token ids within the vocabulary and, given the ``batch`` of utterances, the memory decoding needs against
        ``config.memory_limit(device)``; one line each, before anything compiles)."""
        from speechseq.decoding import config as G
        from speechseq.decoding.generate import group_size, memory_estimate

        dec = self.config.decoder
        defaults = G.defaults_from(self.config.to_dict(), self.generation_json)
        gen = G.make(defaults, dec.max_positions - dec.position_offset, **kwargs)
        for name in ("decoder_start_token_id", "pad_token_id", "forced_bos_token_id", "eos_token_id",
                     "forced_eos_token_id"):
            ids = getattr(gen, name)
            for value in ids if isinstance(ids, tuple) else (ids,):  # EOS ids are a tuple
                if value is not None and not 0 <= value < dec.vocab_size:
                    raise InputError(f"{name}: token id {value} is outside the vocabulary [0, {dec.vocab_size})")
        if batch is not None:
            device = device or jax.devices()[0]
            name = "num_beams" if gen.num_beams > 1 else "num_return_sequences" if group_size(gen) > 1 else "batch"
            check_memory(memory_estimate(self.config, gen, batch, self.dtype),
                         f"{name}: decoding {batch} utterance(s) x {group_size(gen)} "
                         f"{'beams' if gen.num_beams > 1 else 'sequences'} each for up to "
                         f"{gen.max_length} tokens would", device, InputError)
        return gen

    def generate(self, input_values: Any = None, attention_mask: Any = None, *, input_features: Any = None,
                 seed: int = 0, key: Any = None, return_dict: bool = False, **kwargs: Any):
        """Greedy, beam or sampled decoding with transformers' keywords; one compiled program per shape bucket.
        The input is audio ``input_values`` [B, N], or ``input_features`` [B, S, F] for an encoder that reads
        features (``model.generate(**processor(audio))`` passes either).

        Returns int32 sequences [batch * num_return_sequences, length] (column 0 the start token, pad after EOS),
        or with ``return_dict=True`` a dict with ``sequences`` and ``sequences_scores`` (beam search).
        """
        x = self._inputs(input_values, input_features)
        gen = self.generation_config(batch=x.shape[0], device=next(iter(x.devices())), **kwargs)
        mask = _mask(attention_mask, "attention_mask")
        if gen.do_sample and key is None:
            key = jax.random.key(seed)
        args = (self.config, self.params, x, mask, gen, key, self.dtype)
        out = self.decode_layouts.run(args)
        length = int(_host(out.length))
        sequences = _host(out.sequences)[:, :length]
        if not return_dict:
            return sequences
        result = {"sequences": sequences}
        if gen.num_beams > 1:
            result["sequences_scores"] = _host(out.scores)
        return result


def _host(x: jax.Array) -> np.ndarray:
    """``x`` whole as a numpy array; a global array spread over several processes is gathered (``process_allgather``:
    a collective, so with inputs spread over processes every process calls ``generate``)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


_decode_projected_jit = jax.jit(M.decode_projected, static_argnames=("cfg", "dtype", "remat", "capture"))


class DecoderOutput(NamedTuple):
    """``model.decoder(...)`` with ``output_hidden_states`` / ``output_attentions``: transformers' causal-LM output
    (``CausalLMOutputWithCrossAttentions``); each tuple None unless asked."""

    logits: jax.Array  # [B, T, V] float32
    hidden_states: tuple[jax.Array, ...] | None  # the embeddings, then each layer's output [B, T, D]
    attentions: tuple[jax.Array, ...] | None  # per layer [B, N, T, T]
    cross_attentions: tuple[jax.Array, ...] | None  # per layer [B, N, T, S]


def _flag(value: Any, name: str) -> bool:
    """A static output flag (it picks the compiled program): a plain bool, or None for False (transformers' None:
    the config's default, False); one line otherwise (transformers 5's lists of layer indices are not taken)."""
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name}: expected True or False, got {value!r:.60}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class ModelPart:
    """``SpeechSeq2Seq.encoder`` / ``.decoder``: one half of the model, usable and savable alone, as transformers'
    ``model.encoder`` / ``model.decoder`` are. It reads the whole model's params (nothing is copied)."""

    model: SpeechSeq2Seq
    role: str  # "encoder" or "decoder"

    @property
    def config(self) -> dict:
        """This part's HF config dict (what its standalone ``config.json`` holds)."""
        return self.model.config.to_dict()[self.role]

    def state_dict(self) -> dict[str, np.ndarray]:
        """HF tensors under the standalone checkpoint's names (``M.part_rules``)."""
        return table.save(M.part_rules(self.model.config, self.role),
                          to_flat_numpy({self.role: self.model.params[self.role]}))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors of this part alone (a checkpoint
        ``SpeechSeq2Seq.from_encoder_decoder_pretrained`` and transformers' auto classes load)."""
        save_hf(directory, self.config, self.state_dict())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Encoder: ``SpeechSeq2Seq.encode``'s arguments -> EncoderOutput. Decoder: ``(input_ids [B, T],
        encoder_hidden_states [B, S, D], encoder_attention_mask [B, S] = None, attention_mask [B, T] = None)`` ->
        float32 logits [B, T, V]; the frames are at the decoder's width (after ``enc_to_dec_proj``). Both take
        ``output_hidden_states`` / ``output_attentions`` as transformers' standalone classes do; the decoder then
        returns a ``DecoderOutput`` (logits and the tuples) in place of the logits."""
        if self.role == "encoder":
            return self.model.encode(*args, **kwargs)
        return self._decode(*args, **kwargs)

    def _decode(self, input_ids: Any, encoder_hidden_states: Any, encoder_attention_mask: Any = None,
                attention_mask: Any = None, *, output_hidden_states: bool = False,
                output_attentions: bool = False) -> jax.Array | DecoderOutput:
        cfg = self.model.config
        ids = _token_ids(input_ids, "input_ids", cfg.decoder.vocab_size)
        frames = _array(encoder_hidden_states, "encoder_hidden_states", finite=True)
        if ids is None or frames is None:
            raise InputError("decoder: input_ids and encoder_hidden_states are required")
        if frames.ndim != 3 or frames.shape[-1] != cfg.decoder.hidden_size:
            raise InputError(f"encoder_hidden_states: expected [batch, frames, {cfg.decoder.hidden_size}], got shape "
                             f"{tuple(frames.shape)}")
        frame_mask = _mask(encoder_attention_mask, "encoder_attention_mask")
        _check_batch("encoder_hidden_states", frames, ids.shape[0])
        if frame_mask is not None and tuple(frame_mask.shape) != tuple(frames.shape[:2]):
            raise InputError(f"encoder_attention_mask: expected shape {tuple(frames.shape[:2])}, got "
                             f"{tuple(frame_mask.shape)}")
        hidden, attentions = (_flag(output_hidden_states, "output_hidden_states"),
                              _flag(output_attentions, "output_attentions"))
        out = _decode_projected_jit(cfg=cfg, params=self.model.params, decoder_input_ids=ids, enc=frames,
                                    enc_mask=None if frame_mask is None else frame_mask.astype(bool),
                                    decoder_attention_mask=_mask(attention_mask, "attention_mask"),
                                    dtype=self.model.dtype, capture=hidden or attentions)
        if not (hidden or attentions):
            return out
        logits, extra = out
        return DecoderOutput(logits, extra.hidden_states if hidden else None, extra.attentions if attentions else None,
                             extra.cross_attentions if attentions else None)
