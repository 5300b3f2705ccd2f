"""The Speech2Text speech encoder (transformers' ``Speech2TextEncoder``) on log-mel filterbanks (``input_features``,
made by ``fbank.Speech2TextFeatureExtractor``): a subsampler of ``num_conv_layers`` stride-2 Conv1d + GLU, scaled by
sqrt(d_model) when ``scale_embedding``, fairseq's fixed sinusoidal positions (computed, never stored: transformers
keeps them in a non-persistent buffer), pre-norm transformer layers and a final LayerNorm. An encoder family as
``registry.EncoderFamily`` describes it.

Shapes: B batch, F frames of features, C features per frame, S encoder frames, D d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp

from speechseq.checkpoints.table import Rule, dense as dense_rules, norm as norm_rules, rule
from speechseq.config import (ACTIVATION, INT, INT_LIST, EncoderConfig, HFField, hf_dict_field, read_fields,
                              require_heads)
from speechseq.decoders.transformer import sinusoidal_table
from speechseq.encoders.wav2vec2 import TORCH_NORM_EPS, _conv
from speechseq.errors import ConfigError, InputError
from speechseq.layers.core import (block, captured, check_capture, dropout, fold, layer_drop, layer_norm, mlp,
                                   multi_head_attention, remat as remat_fn)

Params = Mapping[str, jax.Array]

INPUT_KIND = "features"  # filterbanks [B, F, C] (input_features)


@dataclass(frozen=True)
class Speech2TextConfig(EncoderConfig):
    """The encoder half of transformers' ``Speech2TextConfig`` (its decoder fields stay in ``hf``)."""

    model_type: str
    hidden_size: int  # d_model
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    num_conv_layers: int
    conv_kernel_sizes: tuple[int, ...]
    conv_channels: int
    input_feat_per_channel: int
    input_channels: int
    max_source_positions: int
    scale_embedding: bool
    pad_token_id: int  # transformers' padding_idx of the position table
    hidden_dropout: float = 0.0  # "dropout": after the positions, the attention output and the feed-forward
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    layerdrop: float = 0.0  # encoder_layerdrop
    hf: dict = hf_dict_field()

    @property
    def input_size(self) -> int:
        """Features per frame the subsampler reads (C)."""
        return self.input_feat_per_channel * self.input_channels

    def describe(self) -> str:
        return super().describe() + f", {self.num_conv_layers} conv subsampling layers over {self.input_size} features"


Config = Speech2TextConfig

# Speech2TextConfig's encoder fields under transformers' names and defaults
FIELDS = (
    HFField("hidden_size", "d_model", 256, INT),
    HFField("num_layers", "encoder_layers", 12, INT),
    HFField("num_heads", "encoder_attention_heads", 4, INT),
    HFField("intermediate_size", "encoder_ffn_dim", 2048, INT),
    HFField("hidden_act", "activation_function", "relu", ACTIVATION),
    HFField("num_conv_layers", "num_conv_layers", 2, INT),
    HFField("conv_kernel_sizes", "conv_kernel_sizes", (5, 5), INT_LIST),
    HFField("conv_channels", "conv_channels", 1024, INT),
    HFField("input_feat_per_channel", "input_feat_per_channel", 80, INT),
    HFField("input_channels", "input_channels", 1, INT),
    HFField("max_source_positions", "max_source_positions", 6000, INT),
    HFField("scale_embedding", "scale_embedding", True, None),
    HFField("pad_token_id", "pad_token_id", 1, dict(low=0)),
    HFField("hidden_dropout", "dropout", 0.1),
    HFField("attention_dropout", "attention_dropout", 0.0),
    HFField("activation_dropout", "activation_dropout", 0.0),
    HFField("layerdrop", "encoder_layerdrop", 0.0),
)


def parse_config(hf: dict, where: str) -> Speech2TextConfig:
    """A ``Speech2TextConfig`` dict -> its encoder config (one-line ``ConfigError``s naming ``where`` and the field)."""
    if "d_model" in hf and "encoder_attention_heads" in hf:
        require_heads(hf, "d_model", "encoder_attention_heads", where)
    if hf.get("pad_token_id", 1) is None:  # transformers' position ids need a padding index
        raise ConfigError(f"{where}: field 'pad_token_id' must be an integer for speech_to_text, got None")
    fields = read_fields(hf, FIELDS, where)
    if len(fields["conv_kernel_sizes"]) != fields["num_conv_layers"]:
        raise ConfigError(f"{where}: conv_kernel_sizes has {len(fields['conv_kernel_sizes'])} entries but "
                          f"num_conv_layers is {fields['num_conv_layers']}")
    if fields["conv_channels"] % 2 and fields["num_conv_layers"] > 1:  # GLU halves the channels
        raise ConfigError(f"{where}: field 'conv_channels' must be even, got {fields['conv_channels']}")
    return Speech2TextConfig(model_type=hf["model_type"], **fields, hf=hf)


def weight_rules(cfg: Speech2TextConfig) -> list[Rule]:
    """Names relative to ``Speech2TextEncoder`` (``{base}``: "" in a SpeechEncoderDecoderModel, "model.encoder." in
    ``Speech2TextForConditionalGeneration``, "encoder." in ``Speech2TextModel``)."""
    D, L, F = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    out: list[Rule] = []
    c_in = cfg.input_size
    for j, k in enumerate(cfg.conv_kernel_sizes):
        c_out = cfg.conv_channels if j < cfg.num_conv_layers - 1 else 2 * D
        hf, path = f"{{base}}conv.conv_layers.{j}", f"subsampler/conv{j}"
        out.append(rule(f"{hf}.weight", f"{path}/kernel", (k, c_in, c_out), (None, None, "conv_out"), layout="conv",
                        init="conv"))
        out.append(rule(f"{hf}.bias", f"{path}/bias", (c_out,), ("conv_out",), init="zeros"))
        c_in = c_out // 2
    lay = "{base}layers.{i}"
    for name, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        out += dense_rules(f"{lay}.self_attn.{hf}", f"layers/attn/{name}", D, D, ("embed", "heads"), layers=L)
    out += dense_rules(f"{lay}.self_attn.out_proj", "layers/attn/o", D, D, ("heads", "embed"), layers=L)
    out += norm_rules(f"{lay}.self_attn_layer_norm", "layers/attn_norm", D, layers=L)
    out += dense_rules(f"{lay}.fc1", "layers/mlp/wi", D, F, ("embed", "mlp"), layers=L)
    out += dense_rules(f"{lay}.fc2", "layers/mlp/wo", F, D, ("mlp", "embed"), layers=L)
    out += norm_rules(f"{lay}.final_layer_norm", "layers/mlp_norm", D, layers=L)
    out += norm_rules("{base}layer_norm", "norm", D)
    return out


def output_lengths(cfg: Speech2TextConfig, lengths: jax.Array) -> jax.Array:
    """Encoder frames from ``lengths`` feature frames (transformers' ``_get_feat_extract_output_lengths``)."""
    for _ in range(cfg.num_conv_layers):
        lengths = (lengths - 1) // 2 + 1
    return lengths


def frame_mask(cfg: Speech2TextConfig, attention_mask: jax.Array, num_frames: int) -> jax.Array:
    """Feature mask [B, F] (or transformers' 3-D form [B, F, C]) -> frame mask [B, S] bool
    (``_get_feature_vector_attention_mask``)."""
    if attention_mask.ndim > 2:  # transformers reads the last feature's column
        attention_mask = attention_mask[:, :, -1]
    lengths = output_lengths(cfg, attention_mask.astype(jnp.int32).sum(-1))
    last = jnp.mod(lengths - 1, num_frames)  # a length of 0 marks the last frame, as transformers' indexing does
    return jnp.arange(num_frames)[None, :] <= last[:, None]


def subsample(cfg: Speech2TextConfig, p: Params, features: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[B, F, C] -> [B, S, D]: each layer a stride-2 conv padded k // 2 on both sides, then a GLU over channels."""
    h = features.astype(dtype)
    for j, k in enumerate(cfg.conv_kernel_sizes):  # widths change per layer: unrolled
        cp = p[f"conv{j}"]
        h = jax.nn.glu(_conv(h, cp["kernel"], 2, k // 2) + cp["bias"].astype(dtype), axis=-1)
    return h


def positions(cfg: Speech2TextConfig, frames: jax.Array | None, num_frames: int) -> jax.Array:
    """Sinusoidal position embeddings [B or 1, S, D] for the frame mask [B, S] (None: every frame real).

    transformers feeds the padding flags (1 = padding) to a position module as if they were token ids with
    ``padding_idx = pad_token_id``: ids equal to it take the zero row, the others count up from pad_token_id + 1.
    With the usual pad_token_id 1 that gives real frames positions 2, 3, ... and padding the zero row."""
    pad = cfg.pad_token_id
    flags = jnp.zeros((1, num_frames), jnp.int32) if frames is None else (~frames).astype(jnp.int32)
    real = (flags != pad).astype(jnp.int32)
    ids = jnp.cumsum(real, axis=1) * real + pad
    # transformers' buffer: max_source_positions + 2 rows, grown (same formula) when a sequence needs more
    rows = max(cfg.max_source_positions + 2, pad + 1 + num_frames)
    return jnp.take(jnp.asarray(sinusoidal_table(rows, cfg.hidden_size, pad)), ids, axis=0)


def check_features(cfg: Speech2TextConfig, features: jax.Array, attention_mask: jax.Array | None) -> None:
    """Static checks on shapes and dtypes, raised at trace time as one-line errors."""
    if features.ndim != 3 or features.shape[2] != cfg.input_size:
        raise InputError(f"input_features: expected shape [batch, frames, {cfg.input_size}], got "
                         f"{tuple(features.shape)}")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise InputError(f"input_features: expected a float array of features, got dtype {features.dtype}")
    if features.shape[1] < 1:
        raise InputError("input_features: expected at least one frame, got 0")
    if attention_mask is not None and tuple(attention_mask.shape[:2]) != tuple(features.shape[:2]):
        raise InputError(f"attention_mask: expected shape {tuple(features.shape[:2])} (batch, frames), got "
                         f"{tuple(attention_mask.shape)}")


# Fixed ids of the random sites (``fold``)
_POS, _LAYERS = 0, 1  # encoder-wide
_ATTN_PROBS, _ATTN_OUT, _ACT, _MLP_OUT, _LAYERDROP = range(5)  # per layer


def encode(cfg: Speech2TextConfig, p: Params, input_features: jax.Array, attention_mask: jax.Array | None, *,
           rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32,
           remat: str = "none", capture: bool = False) -> tuple:
    """Filterbanks [B, F, C] (+ frame mask [B, F]) -> (frames [B, S, D], frame mask [B, S] bool or None), and with
    ``capture`` a third element, ``layers.core.Captured`` as transformers gives it: the first layer's input, each
    layer's output but the last, then the final norm's output (transformers puts ``last_hidden_state`` there), and
    each layer's attention probabilities.

    ``rng`` turns on transformers' training-mode dropout (``dropout`` after the positions, the attention output and
    the feed-forward; ``attention_dropout``; ``activation_dropout``) and LayerDrop (``encoder_layerdrop``).
    ``remat``: the layers' rematerialisation policy (``layers.core.remat``)."""
    check_features(cfg, input_features, attention_mask)
    h = subsample(cfg, p["subsampler"], input_features, dtype)
    if cfg.scale_embedding:
        h = h * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    mask = None if attention_mask is None else frame_mask(cfg, attention_mask, h.shape[1])
    h = dropout(h + positions(cfg, mask, h.shape[1]).astype(dtype), cfg.hidden_dropout, fold(rng, _POS))
    attn_mask = None if mask is None else mask[:, None, None, :]
    if capture:
        check_capture(cfg.layerdrop, rng, "encoder")

    def layer(h: jax.Array, xs: tuple[Params, jax.Array]) -> tuple[jax.Array, tuple | None]:
        lp, i = xs
        lr = fold(rng, _LAYERS, i)
        probs = None

        def attend(x: jax.Array) -> jax.Array:
            nonlocal probs
            out = multi_head_attention(lp["attn"], x, x, attn_mask, cfg.num_heads, dtype,
                                       dropout_rate=cfg.attention_dropout, rng=fold(lr, _ATTN_PROBS),
                                       return_probs=capture)
            if capture:
                out, probs = out
            return dropout(out, cfg.hidden_dropout, fold(lr, _ATTN_OUT))

        def feed_forward(x: jax.Array) -> jax.Array:
            out = mlp(lp["mlp"], x, cfg.hidden_act, dtype, cfg.activation_dropout, fold(lr, _ACT))
            return dropout(out, cfg.hidden_dropout, fold(lr, _MLP_OUT))

        def run(h: jax.Array) -> jax.Array:
            h = block(h, lp["attn_norm"], attend, True, TORCH_NORM_EPS)
            return block(h, lp["mlp_norm"], feed_forward, True, TORCH_NORM_EPS)

        if capture:  # no LayerDrop then (check_capture): ``run`` runs here, not under a cond, and sets ``probs``
            h = run(h)
            return h, (h, probs)
        return layer_drop(run, h, cfg.layerdrop, fold(lr, _LAYERDROP)), None

    first = h
    h, per_layer = jax.lax.scan(remat_fn(layer, remat), h, (p["layers"], jnp.arange(cfg.num_layers)))
    h = layer_norm(p["norm"], h, TORCH_NORM_EPS)
    return (h, mask, captured(first, per_layer, last=h)) if capture else (h, mask)
