"""``SpeechSeq2Seq``: the thin object over the pure functions in ``speechseq.model`` and a params pytree."""

from __future__ import annotations

import concurrent.futures
import copy
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from speechseq import model as M
from speechseq import storage
from speechseq.config import (
    SpeechSeq2SeqConfig,
    config_from_dict,
    decoder_config_from_hf,
    encoder_config_from_hf,
    make_seq2seq_config,
    read_json,
)
from speechseq.errors import InputError
from speechseq.hub import resolve
from speechseq.registry import family
from speechseq.weights import table
from speechseq.weights.checkpoint import (
    fill_missing,
    init_std,
    load_part,
    log_report,
    save_hf,
    to_flat_numpy,
    to_tree,
)
from speechseq.weights.readers import open_checkpoint


TOP_LEVEL_KEYS = ("decoder_start_token_id", "pad_token_id", "eos_token_id")


def _dtype(dtype: Any) -> jnp.dtype:
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise InputError(f"dtype: expected float32 or bfloat16 (or float16), got {dtype!r}") from None


def _token_ids(x: Any, name: str, vocab: int) -> jax.Array | None:
    """Integer ids with every value in [0, vocab) (labels may also be -100); checked on the host before jit."""
    arr = _array(x, name, integer=True)
    if arr is not None:
        ids = np.asarray(arr)
        bad = (ids >= vocab) | ((ids < 0) & ~((ids == -100) & (name == "labels")))
        if bad.any():
            raise InputError(f"{name}: token id {int(ids[bad][0])} is outside the vocabulary [0, {vocab})")
    return arr


def _array(x: Any, name: str, integer: bool = False) -> jax.Array | None:
    if x is None:
        return None
    arr = x if isinstance(x, jax.Array) else np.asarray(x)  # a jax array stays put: a sharded batch stays sharded
    if arr.dtype == object:
        raise InputError(f"{name}: expected a numeric array, got ragged or non-numeric data")
    if integer and not (jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == bool):
        raise InputError(f"{name}: expected integer values, got dtype {arr.dtype}")
    if arr.size == 0:
        raise InputError(f"{name}: is empty (shape {arr.shape})")
    return jnp.asarray(arr)


class SpeechSeq2Seq:
    """A speech encoder joined to a text decoder. ``config`` is static; ``params`` is a pytree of jax arrays."""

    def __init__(self, config: SpeechSeq2SeqConfig, params: Mapping, dtype: Any = jnp.float32,
                 loading_info: table.LoadReport | None = None, generation_json: Mapping | None = None):
        self.config = config
        self.generation_json = None if generation_json is None else dict(generation_json)
        self.params = params
        self.dtype = _dtype(dtype)
        self.loading_info = loading_info or table.LoadReport([], [], [])
        self._decode_cache: tuple | None = None  # (dtype, decoder leaves, {packed for the kernel?: params})

    # -- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: SpeechSeq2SeqConfig | Mapping, seed: int = 0, dtype: Any = jnp.float32
                    ) -> "SpeechSeq2Seq":
        """Random init from a HF ``speech-encoder-decoder`` dict or a ``SpeechSeq2SeqConfig``."""
        cfg = config_from_dict(config)
        flat = table.init_params(M.weight_rules(cfg), seed, init_std(cfg))
        return cls(cfg, to_tree(flat), dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, seed: int = 0,
                        revision: str | None = None) -> "SpeechSeq2Seq":
        """Load a HF ``SpeechEncoderDecoderModel`` checkpoint (directory or hub id; safetensors or .bin, sharded or
        not) without torch. Weights the checkpoint lacks are initialised from ``seed`` and reported."""
        path = resolve(name_or_path, revision)
        cfg = config_from_dict(read_json(path / "config.json"), str(path / "config.json"))
        rules = M.weight_rules(cfg)
        if storage.is_speechseq(path):  # orbax params written by `speechseq convert`
            flat = table.flatten(storage.restore_params(path))
            needed = [p for r in rules for p in r.paths]
            report = table.LoadReport([p for p in needed if p not in flat], sorted(set(flat) - set(needed)),
                                      [p for p in needed if p not in flat])
        else:
            with open_checkpoint(path) as ckpt:
                flat, report = table.load(rules, ckpt, where=str(path))
        log_report(report, str(path))
        flat = fill_missing(rules, flat, report, seed, init_std(cfg))
        gen_path = path / "generation_config.json"
        gen_json = read_json(gen_path) if gen_path.exists() else None
        return cls(cfg, to_tree(flat), dtype, report, gen_json)

    @classmethod
    def from_encoder_decoder_pretrained(cls, encoder: str | os.PathLike, decoder: str | os.PathLike, *,
                                        dtype: Any = jnp.float32, seed: int = 0, **kwargs: Any) -> "SpeechSeq2Seq":
        """Warm start from a speech encoder checkpoint and a text decoder checkpoint.

        ``encoder_*`` / ``decoder_*`` keyword arguments update the sub-configs (``encoder_add_adapter=True``,
        ``decoder_dropout=0.1``); ``decoder_start_token_id``, ``pad_token_id`` and ``eos_token_id`` set the top-level
        fields (the start token defaults to the decoder's ``bos_token_id``).
        The decoder becomes a decoder with cross-attention; its cross-attention (and ``enc_to_dec_proj``, and any
        adapter the encoder checkpoint lacks) are freshly initialised and listed in ``loading_info.missing``.
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
            hf.update({k[len(role) + 1:]: v for k, v in kwargs.items() if k.startswith(role + "_")})
            if role == "decoder":
                hf.update(is_decoder=True, add_cross_attention=True)
            else:
                hf.update(is_decoder=False, add_cross_attention=False)
            parse = encoder_config_from_hf if role == "encoder" else decoder_config_from_hf
            parts[role] = (path, parse(hf, str(path / "config.json")))
        cfg = make_seq2seq_config(parts["encoder"][1], parts["decoder"][1],
                                  {"model_type": "speech-encoder-decoder", "is_encoder_decoder": True, **top})
        flat: dict[str, np.ndarray] = {}
        unexpected: list[str] = []
        for role, (path, sub) in parts.items():
            with open_checkpoint(path) as ckpt:
                part, report = load_part(family(sub.model_type, role), sub, ckpt, str(path))
            flat.update({f"{role}/{k}": v for k, v in part.items()})
            unexpected += [f"{role}.{n}" for n in report.unexpected]
        rules = M.weight_rules(cfg)
        fresh = [p for r in rules for p in r.paths if p not in flat]
        flat.update(table.init_params(rules, seed, init_std(cfg), only=fresh))
        fresh_set = set(fresh)  # named as the joined model names them (not as the standalone sources did)
        missing = [r.names(i)[0] for r in rules if fresh_set.intersection(r.paths) for i in range(r.num_layers)]
        report = table.LoadReport(missing, unexpected, fresh)
        log_report(report, "from_encoder_decoder_pretrained", " (train them before use)")
        return cls(cfg, to_tree(flat), dtype, report)

    # -- compute ---------------------------------------------------------------------------------------------------

    def encode(self, input_values: Any, attention_mask: Any = None) -> M.EncoderOutput:
        """Audio [B, N] -> EncoderOutput (frames [B, S, E], frame mask [B, S])."""
        return M.encode_jit(self.config, self.params, _array(input_values, "input_values"),
                            _array(attention_mask, "attention_mask", integer=True), self.dtype)

    def __call__(self, input_values: Any = None, attention_mask: Any = None, decoder_input_ids: Any = None,
                 decoder_attention_mask: Any = None, labels: Any = None,
                 encoder_outputs: M.EncoderOutput | tuple | None = None, input_features: Any = None) -> M.Seq2SeqOutput:
        """Logits [B, T, V] (and the loss when ``labels`` [B, T] are given, -100 ignored)."""
        if input_features is not None:
            raise InputError(f"input_features: the {self.config.encoder.model_type} encoder reads raw audio; "
                             "pass input_values [batch, samples]")
        if input_values is None and encoder_outputs is None:
            raise InputError("input_values: required unless encoder_outputs are given")
        return M.forward_jit(
            self.config, self.params,
            _array(input_values, "input_values"),
            _array(attention_mask, "attention_mask", integer=True),
            _token_ids(decoder_input_ids, "decoder_input_ids", self.config.decoder.vocab_size),
            _array(decoder_attention_mask, "decoder_attention_mask", integer=True),
            _token_ids(labels, "labels", self.config.decoder.vocab_size),
            encoder_outputs, self.dtype,
        )

    # -- export ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """HF tensors: PyTorch names and layouts of ``SpeechEncoderDecoderModel``."""
        return table.save(M.weight_rules(self.config), to_flat_numpy(self.params))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that ``transformers.SpeechEncoderDecoderModel`` loads."""
        extra = None if self.generation_json is None else {"generation_config.json": self.generation_json}
        save_hf(directory, self.config.to_dict(), self.state_dict(), extra)

    def astype(self, dtype: Any) -> "SpeechSeq2Seq":
        """The same params computing in another dtype."""
        new = copy.copy(self)
        new.dtype = _dtype(dtype)
        return new

    # -- decoding --------------------------------------------------------------------------------------------------

    def generation_config(self, **kwargs: Any):
        """The static ``GenerationConfig`` for these keywords over the checkpoint's defaults (validated)."""
        from speechseq.decoding import config as G

        dec = self.config.decoder
        defaults = G.defaults_from(self.config.to_dict(), self.generation_json)
        return G.make(defaults, dec.max_positions - dec.position_offset, **kwargs)

    def _decoder_params(self, generate_args: tuple | None = None) -> Any:
        """The decoder weights in decode-step layout for ``generate_jit(*generate_args)`` (None: for few rows),
        made on first use and kept while ``params`` and ``dtype`` stay the same (a second copy of the decoder
        weights; ``generate`` without it would redo the layout per call). The layout depends on the steps' rows
        (``prepare_decoder(rows=)``): a model used with both few and many rows keeps one of each.

        On a first use with ``generate_args`` of single-device arrays the layout is made in a worker thread while
        this one compiles the ``generate`` program for the layout's shapes: tracing and most of XLA's passes use one
        core, so the layout's own small compile and run (~1 s for a base-size decoder on 2 cores) come nearly free
        (the abstract lowering is the one the call with the made arrays finds in ``jit``'s cache). Sharded params
        make the layout first.
        """
        from speechseq import kernels
        from speechseq.decoding.generate import generate_jit, group_size, prepare_decoder

        rows = None if generate_args is None else generate_args[2].shape[0] * group_size(generate_args[4])
        packs = (rows is None or rows <= kernels.MAX_ROWS) and kernels.available()  # CPU kernel's layout or XLA's
        leaves = jax.tree.leaves(self.params["decoder"])
        cached = self._decode_cache
        if cached is None or cached[0] != self.dtype or len(cached[1]) != len(leaves) or not all(
                a is b for a, b in zip(cached[1], leaves)):
            cached = self._decode_cache = (self.dtype, leaves, {})
        if packs in cached[2]:
            return cached[2][packs]
        config, params, dtype = self.config, self.params, self.dtype
        single = generate_args is not None and all(
            len(a.sharding.device_set) == 1 for a in jax.tree.leaves(generate_args) if isinstance(a, jax.Array))
        if single:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                made = pool.submit(prepare_decoder, config, params, dtype, rows)
                shapes = jax.eval_shape(lambda p: prepare_decoder(config, p, dtype, rows), params)
                generate_jit.lower(*generate_args, shapes).compile()  # into jit's cache for the call that follows
                decoder_params = made.result()
        else:
            decoder_params = prepare_decoder(config, params, dtype, rows)
        cached[2][packs] = decoder_params
        return decoder_params

    def generate(self, input_values: Any, attention_mask: Any = None, *, seed: int = 0, key: Any = None,
                 return_dict: bool = False, **kwargs: Any):
        """Greedy, beam or sampled decoding with transformers' keywords; one compiled program per shape bucket.

        Returns int32 sequences [batch * num_return_sequences, length] (column 0 the start token, pad after EOS),
        or with ``return_dict=True`` a dict with ``sequences`` and ``sequences_scores`` (beam search).
        """
        from speechseq.decoding.generate import generate_jit

        gen = self.generation_config(**kwargs)
        vocab = self.config.decoder.vocab_size
        for name in ("decoder_start_token_id", "pad_token_id", "forced_bos_token_id"):
            value = getattr(gen, name)
            if value is not None and not 0 <= value < vocab:
                raise InputError(f"{name}: token id {value} is outside the vocabulary [0, {vocab})")
        x = _array(input_values, "input_values")
        mask = _array(attention_mask, "attention_mask", integer=True)
        if gen.do_sample and key is None:
            key = jax.random.key(seed)
        args = (self.config, self.params, x, mask, gen, key, self.dtype)
        out = generate_jit(*args, self._decoder_params(args))
        length = int(out.length)
        sequences = np.asarray(out.sequences)[:, :length]
        if not return_dict:
            return sequences
        result = {"sequences": sequences}
        if gen.num_beams > 1:
            result["sequences_scores"] = np.asarray(out.scores)
        return result
