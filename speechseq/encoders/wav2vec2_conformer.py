"""The Wav2Vec2-Conformer speech encoder (``Wav2Vec2ConformerModel``): wav2vec2's feature encoder, feature projection,
SpecAugment and adapter (imported from ``wav2vec2.py``) around a stack of Conformer blocks, then a final LayerNorm.

Each block (``Wav2Vec2ConformerEncoderLayer``): half a feed-forward step, self-attention, a convolution module
(pointwise conv, GLU, depthwise conv, BatchNorm, activation, pointwise conv), another half feed-forward step and a
LayerNorm; every sub-layer pre-norm with a residual, the block norms at torch's default eps (only the encoder's final
norm takes ``layer_norm_eps``). Positions by ``position_embeddings_type``: "rotary" (queries and keys from inputs
rotated per head, ``rotary_embedding_base``), "relative" (Transformer-XL: sinusoids of the relative distance through
``linear_pos``, with the learned ``pos_bias_u`` / ``pos_bias_v``) or None. The checkpoint's weight-normed positional
conv (``encoder.pos_conv_embed``) is read and written but, as in transformers, never applied.

BatchNorm: in eval mode (no ``rng``) it uses the running statistics, as transformers' ``model.eval()``. In training
mode (a ``rng`` key, ``StepConfig(dropout=True)``) it normalises with the statistics of the batch, as torch's train
mode does (over every frame of the batch, padding included, biased variance), but does not update the running
statistics: ``encode`` is a pure function, so they stay as loaded. Training with ``StepConfig(dropout=False)``
keeps the BatchNorm frozen on its running statistics (what eval then uses). The running statistics, the
``num_batches_tracked`` counter (exact up to 2**24, written back as int64) and the rotary ``inv_freq`` table are
transformers buffers: kept in the params so that checkpoints round-trip bit for bit, and given no gradient.
An encoder family as ``registry.EncoderFamily`` describes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from speechseq.checkpoints.table import Rule, dense as dense_rules, norm as norm_rules, rule
from speechseq.config import INT, TEXT, HFField
from speechseq.encoders import wav2vec2
from speechseq.encoders.wav2vec2 import INPUT_KIND, TORCH_NORM_EPS, Params, frame_mask  # noqa: F401 (the family API)
from speechseq.errors import ConfigError
from speechseq.layers.core import (activation, attention, captured, check_capture, dense, dropout, fold, heads,
                                   layer_drop, layer_norm, merge_heads, mlp, remat as remat_fn)

POSITION_TYPES = ("relative", "rotary", None)
BATCH_NORM_EPS = 1e-5  # nn.BatchNorm1d's default


@dataclass(frozen=True)
class Wav2Vec2ConformerConfig(wav2vec2.Wav2Vec2Config):
    """Wav2Vec2Config with the Conformer block's settings: the position kind (``POSITION_TYPES``), the rotary base,
    the depthwise conv's (odd) kernel and the dropout after the convolution module (training mode only)."""

    position_embeddings_type: str | None = "relative"
    rotary_embedding_base: int = 10000
    conv_depthwise_kernel_size: int = 31
    conformer_conv_dropout: float = 0.0


Config = Wav2Vec2ConformerConfig

# Wav2Vec2ConformerConfig's fields: wav2vec2's without the norm options its model fixes, plus the Conformer's.
# max_source_positions stays in ``hf``: the relative sinusoids are the same whatever the table's length.
FIELDS = tuple(f for f in wav2vec2.FIELDS if f.attr not in ("stable_layer_norm", "feat_proj_layer_norm")) + (
    HFField("position_embeddings_type", "position_embeddings_type", "relative", TEXT),
    HFField("rotary_embedding_base", "rotary_embedding_base", 10000, INT),
    HFField("conv_depthwise_kernel_size", "conv_depthwise_kernel_size", 31, INT),
    HFField("conformer_conv_dropout", "conformer_conv_dropout", 0.1),
)
# always a norm before the feature projection; the encoder's LayerNorm comes after the layers
FIXED = dict(feat_proj_layer_norm=True, stable_layer_norm=True)


def parse_config(hf: dict, where: str) -> Wav2Vec2ConformerConfig:
    """A ``Wav2Vec2ConformerConfig`` dict -> its config (one-line ``ConfigError``s naming ``where`` and the field)."""
    kind = hf.get("position_embeddings_type", "relative")
    if kind not in POSITION_TYPES:
        raise ConfigError(f"{where}: field 'position_embeddings_type' {kind!r} is not supported; supported: "
                          f"{list(POSITION_TYPES)}")
    cfg = wav2vec2.parse_config(hf, where, table=FIELDS, fixed=FIXED, cls=Wav2Vec2ConformerConfig)
    if cfg.conv_depthwise_kernel_size % 2 == 0:  # transformers pads (K - 1) // 2 on each side: 'same' needs odd K
        raise ConfigError(f"{where}: field 'conv_depthwise_kernel_size' should be odd, got "
                          f"{cfg.conv_depthwise_kernel_size}")
    if kind == "rotary" and cfg.head_dim % 2:
        raise ConfigError(f"{where}: rotary position embeddings need an even head size (hidden_size / "
                          f"num_attention_heads), got {cfg.head_dim}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Weight table


def rotary_inv_freq(base: int, shape: tuple[int, ...]) -> np.ndarray:
    """The rotary frequencies [H / 2] float32, as transformers' buffer: base ** -(2j / H) (a fresh model's; a
    checkpoint's own table is loaded instead, so that it round-trips bit for bit)."""
    dim = 2 * shape[0]
    return (1.0 / np.power(np.float64(base), np.arange(0, dim, 2) / dim)).astype(np.float32)


def weight_rules(cfg: Wav2Vec2ConformerConfig) -> list[Rule]:
    """wav2vec2's table without its transformer layers, plus the Conformer blocks (and the rotary buffer)."""
    D, L, F, N, K = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.num_heads, cfg.conv_depthwise_kernel_size
    out = [r for r in wav2vec2.weight_rules(cfg) if not r.paths[0].startswith("layers/")]
    lay = "{base}encoder.layers.{i}"
    for ffn in ("ffn1", "ffn2"):
        out += norm_rules(f"{lay}.{ffn}_layer_norm", f"layers/{ffn}_norm", D, layers=L)
        out += dense_rules(f"{lay}.{ffn}.intermediate_dense", f"layers/{ffn}/wi", D, F, ("embed", "mlp"), layers=L)
        out += dense_rules(f"{lay}.{ffn}.output_dense", f"layers/{ffn}/wo", F, D, ("mlp", "embed"), layers=L)
    out += norm_rules(f"{lay}.self_attn_layer_norm", "layers/attn_norm", D, layers=L)
    for name, hf in (("q", "linear_q"), ("k", "linear_k"), ("v", "linear_v")):
        out += dense_rules(f"{lay}.self_attn.{hf}", f"layers/attn/{name}", D, D, ("embed", "heads"), layers=L)
    out += dense_rules(f"{lay}.self_attn.linear_out", "layers/attn/o", D, D, ("heads", "embed"), layers=L)
    if cfg.position_embeddings_type == "relative":
        out += dense_rules(f"{lay}.self_attn.linear_pos", "layers/attn/pos", D, D, ("embed", "heads"), bias=False,
                           layers=L)
        out += [rule(f"{lay}.self_attn.pos_bias_{s}", f"layers/attn/pos_bias_{s}", (N, cfg.head_dim), (None, None),
                     layers=L) for s in ("u", "v")]
    conv, bn = f"{lay}.conv_module", "layers/conv/batch_norm"
    out += norm_rules(f"{conv}.layer_norm", "layers/conv/norm", D, layers=L)
    out += [
        rule(f"{conv}.pointwise_conv1.weight", "layers/conv/pointwise1", (1, D, 2 * D), (None, "embed", "mlp"),
             layout="conv", init="conv", layers=L),
        rule(f"{conv}.depthwise_conv.weight", "layers/conv/depthwise", (K, 1, D), (None, None, "embed"),
             layout="conv", init="conv", layers=L),
        *norm_rules(f"{conv}.batch_norm", bn, D, layers=L),
        rule(f"{conv}.batch_norm.running_mean", f"{bn}/mean", (D,), ("embed",), init="zeros", layers=L, buffer=True),
        rule(f"{conv}.batch_norm.running_var", f"{bn}/var", (D,), ("embed",), init="ones", layers=L, buffer=True),
        rule(f"{conv}.batch_norm.num_batches_tracked", f"{bn}/count", (), (), init="zeros", layers=L,
             dtype="int64", buffer=True),
        rule(f"{conv}.pointwise_conv2.weight", "layers/conv/pointwise2", (1, D, D), (None, "mlp", "embed"),
             layout="conv", init="conv", layers=L),
    ]
    out += norm_rules(f"{lay}.final_layer_norm", "layers/final_norm", D, layers=L)
    if cfg.position_embeddings_type == "rotary":
        out.append(rule("{base}encoder.embed_positions.inv_freq", "rotary_inv_freq", (cfg.head_dim // 2,), (None,),
                        init=partial(rotary_inv_freq, cfg.rotary_embedding_base), buffer=True))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Positions


def rotate(x: jax.Array, inv_freq: jax.Array, num_heads: int) -> jax.Array:
    """Rotary embedding of the attention input x [B, S, D] split into heads (transformers rotates the input, before
    ``linear_q`` / ``linear_k``): per head x * cos + rotate_half(x) * sin, angles = frame x inv_freq [H / 2]."""
    B, S, D = x.shape
    freqs = jnp.arange(S, dtype=jnp.float32)[:, None] * inv_freq.astype(jnp.float32)[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [S, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    xh = x.reshape(B, S, num_heads, D // num_heads)
    first, second = jnp.split(xh, 2, axis=-1)
    return (xh * cos + jnp.concatenate([-second, first], axis=-1) * sin).reshape(B, S, D)


def relative_sinusoids(num_frames: int, dim: int) -> np.ndarray:
    """transformers' relative position table for S frames, [2S - 1, D] float32: row j encodes the distance S - 1 - j
    (query minus key), sin at even and cos at odd channels, computed in float32 as there."""
    div = np.exp(np.arange(0, dim, 2).astype(np.float32) * np.float32(-(math.log(10000.0) / dim)))
    dist = np.arange(num_frames - 1, -num_frames, -1).astype(np.float32)[:, None]
    angles = dist * div[None, :]
    out = np.empty((2 * num_frames - 1, dim), np.float32)
    out[:, 0::2], out[:, 1::2] = np.sin(angles), np.cos(angles)
    return out


def skew(scores: jax.Array) -> jax.Array:
    """Transformer-XL's shift: [..., S, 2S - 1] scores against distances S - 1 ... 1 - S -> [..., S, S] with
    out[i, k] = scores[i, S - 1 - i + k] (the distance i - k), by the same pad-and-reshape as transformers."""
    *lead, S, W = scores.shape
    padded = jnp.pad(scores, [(0, 0)] * len(lead) + [(0, 0), (1, 0)]).reshape(*lead, W + 1, S)
    return padded[..., 1:, :].reshape(*lead, S, W)[..., :S]


# ----------------------------------------------------------------------------------------------------------------------
# The Conformer block


def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' depthwise conv over time, x [B, S, D], kernel [K, 1, D] (K odd) -> [B, S, D]: a sum of K shifted,
    scaled copies, whose gradient is element-wise (XLA differentiates a D-group convolution w.r.t. its kernel as a
    batch-grouped convolution, slow on CPU; see ``wav2vec2.grouped_conv``)."""
    K, S = kernel.shape[0], x.shape[1]
    padded = jnp.pad(x, ((0, 0), ((K - 1) // 2, (K - 1) // 2), (0, 0)))
    w = kernel[:, 0, :].astype(x.dtype)
    return sum(padded[:, k:k + S] * w[k] for k in range(K))


def batch_norm(p: Params, x: jax.Array, training: bool) -> jax.Array:
    """BatchNorm1d over the channels of x [B, S, D] (statistics in float32): the running statistics in eval mode,
    the batch's (every frame, biased variance) in training mode. The running statistics are buffers, not weights:
    no gradient reaches them."""
    xf = x.astype(jnp.float32)
    if training:
        mean = xf.mean((0, 1))
        var = jnp.square(xf - mean).mean((0, 1))
    else:
        mean, var = jax.lax.stop_gradient(p["mean"]), jax.lax.stop_gradient(p["var"])
    return ((xf - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * p["scale"] + p["bias"]).astype(x.dtype)


def conv_module(cfg: Wav2Vec2ConformerConfig, p: Params, x: jax.Array, dtype: jnp.dtype, training: bool,
                rng: jax.Array | None) -> jax.Array:
    """x [B, S, D] -> [B, S, D] before the residual: norm, pointwise conv to 2D, GLU, depthwise conv, BatchNorm,
    activation, pointwise conv, dropout (``conformer_conv_dropout``)."""
    h = layer_norm(p["norm"], x, TORCH_NORM_EPS)
    h = jax.nn.glu(jnp.dot(h.astype(dtype), p["pointwise1"][0].astype(dtype)), axis=-1)
    h = batch_norm(p["batch_norm"], depthwise_conv(h, p["depthwise"]), training)
    h = jnp.dot(activation(cfg.hidden_act)(h), p["pointwise2"][0].astype(dtype))
    return dropout(h, cfg.conformer_conv_dropout, rng)


def self_attention(cfg: Wav2Vec2ConformerConfig, p: Params, x: jax.Array, mask: jax.Array | None,
                   positions: jax.Array | None, dtype: jnp.dtype, rng: jax.Array | None,
                   return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """x [B, S, D] (key mask [B, 1, 1, S] or None) -> [B, S, D] (and with ``return_probs`` the attention
    probabilities [B, N, S, S]). ``positions``: the rotary ``inv_freq`` [H / 2] or the relative table [2S - 1, D]
    (None without position embeddings)."""
    N = cfg.num_heads
    qk = rotate(x, positions, N) if cfg.position_embeddings_type == "rotary" else x
    q, k, v = heads(p["q"], qk, N, dtype), heads(p["k"], qk, N, dtype), heads(p["v"], x, N, dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = None
    if cfg.position_embeddings_type == "relative":
        pos = jnp.dot(positions.astype(dtype), p["pos"]["kernel"].astype(dtype)).reshape(positions.shape[0], N, -1)
        q_v = q + p["pos_bias_v"].astype(dtype)[None, :, None, :]
        bias = skew(jnp.einsum("bnth,jnh->bntj", q_v, pos, preferred_element_type=jnp.float32)) * scale
        q = q + p["pos_bias_u"].astype(dtype)[None, :, None, :]
    out = attention(q, k, v, mask, scale, dropout_rate=cfg.attention_dropout, rng=rng, bias=bias,
                    return_probs=return_probs)
    if return_probs:
        return merge_heads(p["o"], out[0], dtype), out[1]
    return merge_heads(p["o"], out, dtype)


# Fixed ids of the random sites (``fold``), per layer
_FFN1_ACT, _FFN1_OUT, _ATTN_PROBS, _ATTN_OUT, _CONV, _FFN2_ACT, _FFN2_OUT, _LAYERDROP = range(8)


def encode(cfg: Wav2Vec2ConformerConfig, p: Params, input_values: jax.Array, attention_mask: jax.Array | None, *,
           rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32,
           remat: str = "none", capture: bool = False) -> tuple:
    """Audio [B, N] (+ sample mask [B, N]) -> (frames [B, S, output_size], frame mask [B, S] bool or None), and with
    ``capture`` a third element, ``layers.core.Captured`` as transformers 5 gives it: the first block's input and
    each block's output (the encoder's final norm in none of them, all before the adapter), and each block's
    attention probabilities.

    ``rng``: training mode, as ``wav2vec2.encode`` (dropout, SpecAugment, LayerDrop), plus the convolution module's
    dropout and BatchNorm on batch statistics (module docstring); None: eval mode. ``remat``: the layers' policy."""
    # wav2vec2's front end (its random-site ids too, so a key draws the same masks there)
    wav2vec2.check_audio(cfg, input_values, attention_mask)
    feats = wav2vec2.feature_encoder(cfg, p["feature_encoder"], input_values, dtype)
    fp = p["feature_projection"]
    h = dense(fp["proj"], layer_norm(fp["norm"], feats, cfg.layer_norm_eps), dtype)
    h = dropout(h, cfg.feat_proj_dropout, fold(rng, wav2vec2._FEAT_PROJ))
    mask = None if attention_mask is None else frame_mask(cfg, attention_mask, h.shape[1], with_adapter=False)
    h = wav2vec2.spec_augment(cfg, p, h, mask, fold(rng, wav2vec2._SPEC_AUGMENT))
    if mask is not None:
        h = jnp.where(mask[:, :, None], h, 0)
    h = dropout(h, cfg.hidden_dropout, fold(rng, wav2vec2._POS))
    positions = None
    if cfg.position_embeddings_type == "rotary":  # the checkpoint's buffer, as transformers uses it: no gradient
        positions = jax.lax.stop_gradient(p["rotary_inv_freq"])
    elif cfg.position_embeddings_type == "relative":
        positions = jnp.asarray(relative_sinusoids(h.shape[1], cfg.hidden_size))
    attn_mask = None if mask is None else mask[:, None, None, :]
    training = rng is not None
    if capture:
        check_capture(cfg.layerdrop, rng, "encoder")

    def layer(h: jax.Array, xs: tuple[Params, jax.Array]) -> tuple[jax.Array, tuple | None]:
        lp, i = xs
        lr = fold(rng, wav2vec2._LAYERS, i)
        probs = None

        def half_ffn(h: jax.Array, name: str, act_site: int, out_site: int) -> jax.Array:
            out = mlp(lp[name], layer_norm(lp[f"{name}_norm"], h, TORCH_NORM_EPS), cfg.hidden_act, dtype,
                      cfg.activation_dropout, fold(lr, act_site))
            return h + 0.5 * dropout(out, cfg.hidden_dropout, fold(lr, out_site))

        def run(h: jax.Array) -> jax.Array:
            nonlocal probs
            h = half_ffn(h, "ffn1", _FFN1_ACT, _FFN1_OUT)
            out = self_attention(cfg, lp["attn"], layer_norm(lp["attn_norm"], h, TORCH_NORM_EPS), attn_mask,
                                 positions, dtype, fold(lr, _ATTN_PROBS), capture)
            if capture:
                out, probs = out
            h = h + dropout(out, cfg.attention_dropout, fold(lr, _ATTN_OUT))  # transformers' self_attn_dropout rate
            h = h + conv_module(cfg, lp["conv"], h, dtype, training, fold(lr, _CONV))
            h = half_ffn(h, "ffn2", _FFN2_ACT, _FFN2_OUT)
            return layer_norm(lp["final_norm"], h, TORCH_NORM_EPS)

        if capture:  # no LayerDrop then (check_capture): ``run`` runs here, not under a cond, and sets ``probs``
            h = run(h)
            return h, (h, probs)
        return layer_drop(run, h, cfg.layerdrop, fold(lr, _LAYERDROP)), None

    first = h
    h, per_layer = jax.lax.scan(remat_fn(layer, remat), h, (p["layers"], jnp.arange(cfg.num_layers)))
    h = layer_norm(p["norm"], h, cfg.layer_norm_eps)
    if cfg.add_adapter:  # (transformers' adapter LayerDrop is not done: see wav2vec2.encode)
        h = wav2vec2.adapter(cfg, p["adapter"], h, dtype)
    if attention_mask is not None:
        mask = frame_mask(cfg, attention_mask, h.shape[1], with_adapter=cfg.add_adapter)
    return (h, mask, captured(first, per_layer)) if capture else (h, mask)
