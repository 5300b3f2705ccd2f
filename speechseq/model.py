"""The seq2seq apply as pure functions of ``(params, inputs)`` with the config static: encode, decode, forward, loss.

    enc = encode(cfg, params, inputs, attention_mask)                # EncoderOutput; inputs: audio or features
    out = forward(cfg, params, inputs, attention_mask, labels=labels)         # or input_values= / input_features=
    jax.jit(forward, static_argnames=("cfg", "dtype"))               # or use the pre-jitted ``forward_jit``
    forward(cfg, params, input_values, attention_mask, labels=labels, rng=jax.random.key(0))  # training mode

``rng=None`` (the default) is transformers' eval mode; a ``jax.random`` key turns on dropout, LayerDrop and
SpecAugment with the settings in the config (the same key gives the same result).

The encoder's input is raw audio ``input_values`` [B, N] or ``input_features`` [B, S, F], by the kind its family
declares (``registry.Family.input_kind``), or either as ``inputs`` (transformers' first argument); ``encoder_input``
picks it and refuses the other kind, or the input given twice, in one line. Masks may be bool, integer or float 0/1
(``as_mask``). ``decoder_inputs_embeds`` [B, T, D] stand in for ``decoder_input_ids`` as transformers' do.

``output_hidden_states=True`` / ``output_attentions=True`` (static) add transformers' per-layer outputs to
``Seq2SeqOutput`` / ``EncoderOutput`` (``layers.core.Captured``); without them the layer scans emit nothing more.

``params`` is ``{"encoder": ..., "decoder": ..., "enc_to_dec_proj"?: ...}`` (see ``weight_rules``).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from speechseq.config import INPUT_KINDS, InputKind, SpeechSeq2SeqConfig
from speechseq.decoders import transformer
from speechseq.errors import InputError
from speechseq.layers.core import Captured, dense, fold
from speechseq.registry import family
from speechseq.checkpoints.table import Rule, dense as dense_rules, prefixed

Params = Mapping[str, Any]


class EncoderOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, S, E] encoder frames (before enc_to_dec_proj), as transformers returns them
    attention_mask: jax.Array | None  # [B, S] bool frame mask, None when no sample mask was given
    # output_hidden_states: the first layer's input and each layer's output, L + 1 arrays [B, S', D] (S' the layers'
    # frames: SEW's squeezed ones), as the family's transformers model returns them
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None  # output_attentions: per layer [B, N, S', S'] probabilities


class Seq2SeqOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    loss: jax.Array | None  # scalar: mean cross-entropy over labels != -100 (``cross_entropy_sum`` for sum and count)
    encoder_last_hidden_state: jax.Array  # [B, S, D] encoder frames after enc_to_dec_proj, as transformers 5
    encoder_attention_mask: jax.Array | None  # [B, S]
    # output_hidden_states / output_attentions, as transformers' Seq2SeqLMOutput (``layers.core.Captured``):
    encoder_hidden_states: tuple[jax.Array, ...] | None = None  # the encoder's own (before enc_to_dec_proj)
    encoder_attentions: tuple[jax.Array, ...] | None = None  # per layer [B, N, S', S']
    decoder_hidden_states: tuple[jax.Array, ...] | None = None  # embeddings, then each layer's output [B, T, D]
    decoder_attentions: tuple[jax.Array, ...] | None = None  # per layer [B, N, T, T]
    cross_attentions: tuple[jax.Array, ...] | None = None  # per layer [B, N, T, S]


def part_rules(cfg: SpeechSeq2SeqConfig, role: str) -> list[Rule]:
    """The table of the encoder or the decoder (``role``) as a standalone checkpoint of its family: the bare model
    for an encoder (``Wav2Vec2Model``), the causal-LM class for a decoder (``BertLMHeadModel``); paths under
    ``role/`` as in the whole model's params."""
    fam = family(getattr(cfg, role).model_type, role)
    return prefixed(fam.weight_rules(getattr(cfg, role)), "", f"{role}/", base=fam.prefixes[0])


def weight_rules(cfg: SpeechSeq2SeqConfig) -> list[Rule]:
    """The full table of a ``SpeechEncoderDecoderModel`` state dict."""
    rules = prefixed(part_rules(cfg, "encoder"), "encoder.", "") + prefixed(part_rules(cfg, "decoder"), "decoder.", "")
    if cfg.has_enc_to_dec_proj:
        rules += dense_rules("enc_to_dec_proj", "enc_to_dec_proj", cfg.encoder.output_size, cfg.decoder.hidden_size,
                             ("embed_out", "embed"))
    return rules


# Fixed ids of the random streams of encoder and decoder (``fold``)
_ENCODER, _DECODER = 0, 1


def input_kind(cfg: SpeechSeq2SeqConfig) -> InputKind:
    """What the encoder reads: its keyword (``input_values`` or ``input_features``), rank and description."""
    return INPUT_KINDS[family(cfg.encoder.model_type, "encoder").input_kind]


def encoder_input(cfg: SpeechSeq2SeqConfig, input_values: Any = None, input_features: Any = None,
                  inputs: Any = None) -> Any:
    """The encoder's input (None when it is not given): ``inputs`` (transformers' first argument: whatever kind the
    encoder reads) or the one of ``input_values`` / ``input_features`` the encoder takes; a one-line ``InputError``
    when the other one is given, or ``inputs`` as well as either."""
    want = input_kind(cfg)
    for name, value in (("input_values", input_values), ("input_features", input_features)):
        if value is not None and name != want.name:
            raise InputError(f"{name}: the {cfg.encoder.model_type} encoder takes {want.name} ({want.description})")
    named = input_values if want.name == "input_values" else input_features
    if inputs is not None and named is not None:  # transformers would silently use ``inputs``: a caller's mistake
        raise InputError(f"inputs: given together with {want.name}; give the encoder's input once")
    audio = INPUT_KINDS["waveform"]
    if want.name != audio.name and getattr(inputs, "ndim", None) == audio.rank:
        # raw audio (what the first argument was before it was ``inputs``) to an encoder that reads features
        raise InputError(f"{audio.name}: the {cfg.encoder.model_type} encoder takes {want.name} ({want.description})")
    return named if inputs is None else inputs


def as_mask(mask: jax.Array | None) -> jax.Array | None:
    """A 0/1 mask of any dtype as the encoders read it: float masks (transformers takes them as it takes integer
    ones) become int32, bool and integer masks stay as they are. Values other than 0/1 are the caller's to refuse
    (``SpeechSeq2Seq`` checks them on the host)."""
    if mask is not None and jnp.issubdtype(mask.dtype, jnp.floating):
        return mask.astype(jnp.int32)
    return mask


def encode(cfg: SpeechSeq2SeqConfig, params: Params, inputs: jax.Array, attention_mask: jax.Array | None = None,
           dtype: Any = jnp.float32, rng: jax.Array | None = None, remat: str = "none",
           output_hidden_states: bool = False, output_attentions: bool = False) -> EncoderOutput:
    """The encoder's input, whatever its kind (audio [B, N] or features [B, S, F], see ``input_kind``) with its mask
    -> EncoderOutput (frames [B, S, E], frame mask [B, S]; per-layer hidden states and attention probabilities when
    asked, as transformers' encoder returns them).
    ``rng``: a ``jax.random`` key for dropout, LayerDrop and SpecAugment (training mode), None for eval mode.
    ``remat``: the layers' rematerialisation policy for the backward pass ("none", "layer", "dots";
    ``layers.core.remat``)."""
    apply = family(cfg.encoder.model_type, "encoder").apply
    capture = output_hidden_states or output_attentions
    out = apply(cfg.encoder, params["encoder"], inputs, as_mask(attention_mask), rng=rng, dtype=jnp.dtype(dtype),
                remat=remat, **({"capture": True} if capture else {}))
    if not capture:
        return EncoderOutput(*out)
    hidden, mask, extra = out
    return EncoderOutput(hidden, mask, extra.hidden_states if output_hidden_states else None,
                         extra.attentions if output_attentions else None)


def with_frame_mask(cfg: SpeechSeq2SeqConfig, encoder_outputs: EncoderOutput | tuple,
                    attention_mask: jax.Array | None) -> EncoderOutput:
    """Precomputed encoder output as an EncoderOutput whose frame mask [B, S] comes from the input's mask (samples
    [B, N] or feature frames) when it carries none (transformers derives it so whenever ``attention_mask`` is
    given)."""
    if not isinstance(encoder_outputs, EncoderOutput):
        if not isinstance(encoder_outputs, (tuple, list)):
            got = "an array" if hasattr(encoder_outputs, "shape") else type(encoder_outputs).__name__  # maybe traced
            raise InputError("encoder_outputs: expected an EncoderOutput or a tuple whose first element is the "
                             f"frames [B, S, E], got {got}")
        # transformers' tuple, read as its BaseModelOutput(*tuple): (last_hidden_state, hidden_states?, attentions?)
        encoder_outputs = EncoderOutput(encoder_outputs[0], None, *encoder_outputs[1:3])
    if encoder_outputs.attention_mask is not None or attention_mask is None:
        return encoder_outputs
    hidden = encoder_outputs.last_hidden_state
    mask = family(cfg.encoder.model_type, "encoder").frame_mask(cfg.encoder, attention_mask, hidden.shape[1])
    return encoder_outputs._replace(attention_mask=mask)


def project(cfg: SpeechSeq2SeqConfig, params: Params, hidden: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Encoder frames [B, S, E] -> the width the decoder's cross-attention reads [B, S, D]."""
    return dense(params["enc_to_dec_proj"], hidden, jnp.dtype(dtype)) if cfg.has_enc_to_dec_proj else hidden


def decode(cfg: SpeechSeq2SeqConfig, params: Params, decoder_input_ids: jax.Array, encoder_output: EncoderOutput,
           decoder_attention_mask: jax.Array | None = None, dtype: Any = jnp.float32,
           rng: jax.Array | None = None, remat: str = "none") -> jax.Array:
    """Teacher-forced decoder over precomputed encoder output: ids [B, T] -> float32 logits [B, T, V].
    ``rng``: a ``jax.random`` key for dropout and LayerDrop (training mode), None for eval mode; ``remat``: see
    ``encode``."""
    return decode_projected(cfg, params, decoder_input_ids, project(cfg, params, encoder_output.last_hidden_state,
                                                                     dtype), encoder_output.attention_mask,
                             decoder_attention_mask, dtype, rng, remat)


def decode_projected(cfg: SpeechSeq2SeqConfig, params: Params, decoder_input_ids: jax.Array | None, enc: jax.Array,
                     enc_mask: jax.Array | None, decoder_attention_mask: jax.Array | None, dtype: Any,
                     rng: jax.Array | None = None, remat: str = "none",
                     decoder_inputs_embeds: jax.Array | None = None,
                     capture: bool = False) -> jax.Array | tuple[jax.Array, Captured]:
    """The decoder over frames already at its width (after ``enc_to_dec_proj``): ids [B, T] (or
    ``decoder_inputs_embeds`` [B, T, D]), frames [B, S, D], frame mask [B, S] bool or None -> float32 logits
    [B, T, V]. What ``decode`` and ``forward`` run after ``project``, and the decoder used alone. ``capture``:
    (logits, ``Captured``: transformers' decoder hidden states, self- and cross-attention probabilities)."""
    name, given = (("decoder_input_ids", decoder_input_ids) if decoder_inputs_embeds is None
                   else ("decoder_inputs_embeds", decoder_inputs_embeds))
    if given is not None and given.ndim >= 1 and enc.shape[0] != given.shape[0]:
        raise InputError(f"{name}: batch {given.shape[0]} does not match the audio batch {enc.shape[0]}")
    dtype = jnp.dtype(dtype)
    # rematerialised, each layer makes its cross K/V in the scan (recomputed in the backward pass, not kept)
    cross = cross_kv(cfg, params, enc, dtype) if remat == "none" else transformer.CrossFrames(enc)
    out = family(cfg.decoder.model_type, "decoder").apply(cfg.decoder, params["decoder"], decoder_input_ids, cross,
                                                          enc_mask, decoder_attention_mask, dtype=dtype, rng=rng,
                                                          remat=remat, inputs_embeds=decoder_inputs_embeds,
                                                          capture=capture)
    return (out[0], out[2]) if capture else out[0]


def cross_kv(cfg: SpeechSeq2SeqConfig, params: Params, enc: jax.Array, dtype: Any = jnp.float32) -> transformer.CrossKV:
    """Projected encoder frames [B, S, D] -> cross-attention K/V of every decoder layer, once per utterance."""
    return transformer.cross_kv(cfg.decoder, params["decoder"], enc, jnp.dtype(dtype))


def shift_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """Teacher-forcing inputs from labels [B, T]: start token first, -100 replaced by pad (transformers' rule)."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy over labels != -100 and the number of those tokens: logits [B, T, V], labels
    [B, T] -> (float32 scalar, int32 scalar). Summing both over micro-batches and dividing at the end weighs every
    token as one large batch does (gradient accumulation), where averaging per-batch means would not."""
    valid = labels != -100
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean token cross-entropy over labels != -100 (float32 scalar), as torch's ``CrossEntropyLoss``."""
    total, count = cross_entropy_sum(logits, labels)
    return total / count


def forward(cfg: SpeechSeq2SeqConfig, params: Params, inputs: jax.Array | None = None,
            attention_mask: jax.Array | None = None, decoder_input_ids: jax.Array | None = None,
            decoder_attention_mask: jax.Array | None = None, labels: jax.Array | None = None,
            encoder_outputs: EncoderOutput | tuple | None = None, dtype: Any = jnp.float32,
            rng: jax.Array | None = None, remat: str = "none", input_features: jax.Array | None = None,
            input_values: jax.Array | None = None, decoder_inputs_embeds: jax.Array | None = None,
            output_hidden_states: bool = False, output_attentions: bool = False) -> Seq2SeqOutput:
    """Full model: the encoder's input (``inputs``, as transformers' first argument: audio [B, N] or features
    [B, S, F], whichever the encoder reads; or by name ``input_values`` / ``input_features``; or
    ``encoder_outputs``) and decoder ids [B, T], or ``decoder_inputs_embeds`` [B, T, D], or labels [B, T]
    (shifted right when neither is given) -> Seq2SeqOutput. Masks may be bool, integer or float 0/1.

    ``encoder_outputs`` is an EncoderOutput or, as in transformers, a tuple (frames [B, S, E], hidden states?,
    attentions?), the latter two only passed on to the output. Without a frame mask of their own they get one from ``attention_mask`` (the
    input's mask). ``rng``: a ``jax.random`` key for dropout, LayerDrop and SpecAugment (training mode; the encoder
    and the decoder get keys folded from it), None for eval mode. ``remat``: the layers' rematerialisation policy
    for the backward pass ("none", "layer" or "dots"; ``layers.core.remat``).

    ``output_hidden_states`` / ``output_attentions`` (static): the per-layer outputs of transformers'
    ``Seq2SeqLMOutput`` (``encoder_hidden_states``, ``decoder_hidden_states``; ``encoder_attentions``,
    ``decoder_attentions``, ``cross_attentions``), computed only when asked. Given ``encoder_outputs``, the encoder's
    are those they carry, as in transformers. The probabilities are those after attention dropout, as transformers'
    eager attention returns them; with LayerDrop in training mode a one-line ``InputError`` (``check_capture``).
    """
    inputs = encoder_input(cfg, input_values, input_features, inputs)
    attention_mask = as_mask(attention_mask)
    if encoder_outputs is None:
        if inputs is None:
            raise InputError(f"{input_kind(cfg).name}: required unless encoder_outputs are given")
        encoder_outputs = encode(cfg, params, inputs, attention_mask, dtype, fold(rng, _ENCODER), remat,
                                 output_hidden_states, output_attentions)
    encoder_outputs = with_frame_mask(cfg, encoder_outputs, attention_mask)
    if decoder_input_ids is not None and decoder_inputs_embeds is not None:
        raise InputError(transformer.BOTH_IDS_AND_EMBEDS)
    if decoder_input_ids is None and decoder_inputs_embeds is None:  # transformers shifts labels only then
        if labels is None:
            raise InputError("decoder_input_ids: required unless decoder_inputs_embeds or labels are given (labels "
                             "are shifted right)")
        if cfg.decoder_start_token_id is None or cfg.pad_token_id is None:
            raise InputError("labels: config needs decoder_start_token_id and pad_token_id to build decoder inputs")
        decoder_input_ids = shift_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
    enc = project(cfg, params, encoder_outputs.last_hidden_state, dtype)
    capture = output_hidden_states or output_attentions
    logits = decode_projected(cfg, params, decoder_input_ids, enc, encoder_outputs.attention_mask,
                              decoder_attention_mask, dtype, fold(rng, _DECODER), remat, decoder_inputs_embeds, capture)
    extra = dict(encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions)
    if capture:
        logits, dec = logits
        if output_hidden_states:
            extra.update(decoder_hidden_states=dec.hidden_states)
        if output_attentions:
            extra.update(decoder_attentions=dec.attentions, cross_attentions=dec.cross_attentions)
    loss = None if labels is None else cross_entropy(logits, labels)
    return Seq2SeqOutput(logits, loss, enc, encoder_outputs.attention_mask, **extra)


_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")
forward_jit = jax.jit(forward, static_argnames=("cfg", "dtype", "remat", *_OUTPUT_FLAGS))
encode_jit = jax.jit(encode, static_argnames=("cfg", "dtype", "remat", *_OUTPUT_FLAGS))
decode_jit = jax.jit(decode, static_argnames=("cfg", "dtype", "remat"))
