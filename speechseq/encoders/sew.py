"""The SEW speech encoder (``SEWModel``, "Squeezed and Efficient Wav2vec"): wav2vec2's conv feature encoder and
post-norm transformer layers, run on a sequence squeezed ``squeeze_factor`` times and stretched back after.

Between the feature encoder and the layers: a LayerNorm over the conv features (always there, named ``layer_norm``
at the model's root), then a plain ``feature_projection`` Linear only when ``conv_dim[-1] != hidden_size``. The
squeeze adds the average-pooled frames (window and stride ``squeeze_factor``) to wav2vec2's weight-normed positional
conv taken at that stride; the layers attend over the pooled mask (a pooled frame is real if any of its frames is).
After the layers, ``upsample`` (Linear to ``hidden_size * squeeze_factor`` and the feature activation) unfolds each
frame's channels into ``squeeze_factor`` frames, zero-padded to the feature encoder's frame count. The frames that
leave the encoder have the feature encoder's frame mask, which transformers also gives the decoder's
cross-attention. An encoder family as ``registry.EncoderFamily`` describes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from speechseq.checkpoints.table import Rule, dense as dense_rules, norm as norm_rules
from speechseq.config import INT, HFField
from speechseq.encoders import unispeech, wav2vec2
from speechseq.encoders.wav2vec2 import _FEAT_PROJ, _POS, _SPEC_AUGMENT, Params  # its random sites: the same keys
from speechseq.encoders.wav2vec2 import INPUT_KIND  # noqa: F401 (the family API)
from speechseq.errors import InputError
from speechseq.layers.core import activation, captured, dense, dropout, fold, layer_norm


@dataclass(frozen=True)
class SEWConfig(wav2vec2.Wav2Vec2Config):
    """Wav2Vec2Config with the squeeze: the layers run on ``squeeze_factor`` times fewer frames."""

    squeeze_factor: int = 2

    @property
    def project_features(self) -> bool:
        """Whether the model has ``feature_projection`` (transformers adds it only to change the width)."""
        return self.conv_dim[-1] != self.hidden_size

    def describe(self) -> str:
        return super().describe() + f", squeeze x{self.squeeze_factor}"


Config = SEWConfig

# SEWConfig lacks what UniSpeech's lacks (no adapter, no feat_proj_layer_norm: its norm is always there) and
# do_stable_layer_norm (post-norm layers only); it adds squeeze_factor
FIELDS = tuple(f for f in unispeech.FIELDS if f.attr != "stable_layer_norm") + (
    HFField("squeeze_factor", "squeeze_factor", 2, INT),
)


def fixed(hf: dict) -> dict:
    """The values of the Wav2Vec2Config fields SEW's transformers class fixes (SEW-D's too)."""
    # SEWModel hands its SpecAugment no attention mask: time spans range over the padded length, as HuBERT's
    return dict(unispeech.fixed(hf), stable_layer_norm=False, spec_augment_lengths=False)


def parse_config(hf: dict, where: str) -> SEWConfig:
    """A ``SEWConfig`` dict -> its config (one-line ``ConfigError``s naming ``where`` and the field)."""
    return wav2vec2.parse_config(hf, where, table=FIELDS, fixed=fixed(hf), cls=SEWConfig)


def weight_rules(cfg: SEWConfig) -> list[Rule]:
    """wav2vec2's table with SEW's names before the layers (the root ``layer_norm``, an optional bare
    ``feature_projection`` Linear) and the ``encoder.upsample`` projection."""
    C, D = cfg.conv_dim[-1], cfg.hidden_size
    out = [r for r in wav2vec2.weight_rules(cfg) if not r.paths[0].startswith("feature_projection/")]
    out += norm_rules("{base}layer_norm", "feature_projection/norm", C, axis="conv_out")
    if cfg.project_features:
        out += dense_rules("{base}feature_projection", "feature_projection/proj", C, D, ("conv_out", "embed"))
    out += dense_rules("{base}encoder.upsample.projection", "upsample", D, D * cfg.squeeze_factor, ("embed", "mlp"))
    return out


def frame_mask(cfg: SEWConfig, attention_mask: jax.Array, num_frames: int) -> jax.Array:
    """Sample mask [B, N] -> frame mask [B, S] bool: the first ``output_lengths`` frames (SEW's
    ``_get_feature_vector_attention_mask``; unlike wav2vec2's, a row of length 0 has no frame at all)."""
    lengths = wav2vec2.output_lengths(cfg, attention_mask.astype(jnp.int32).sum(-1), with_adapter=False)
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


def squeeze(cfg: SEWConfig, p: Params, h: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Frames [B, S, D] (+ mask [B, S]) -> [B, S // squeeze_factor, D] (+ pooled mask): average-pooled frames plus
    the positional conv at stride ``squeeze_factor`` (``p``: the ``pos_conv`` weights)."""
    f = cfg.squeeze_factor
    B, S, D = h.shape
    T = S // f  # AvgPool1d drops a partial window; the strided conv gives at least T frames, of which T are kept
    pooled = h[:, : T * f].reshape(B, T, f, D).mean(2)
    # wav2vec2's stride-1 conv at every f-th frame: the same frames as transformers' strided conv (same padding),
    # and the conv keeps its fast kernel gradient (``wav2vec2.grouped_conv``) for f times its small cost
    pos = wav2vec2.positional_conv(cfg, p, h)[:, : T * f : f]
    pooled_mask = None if mask is None else mask[:, : T * f].reshape(B, T, f).any(-1)  # max_pool1d
    return pooled + pos, pooled_mask


def upsample(cfg: SEWConfig, p: Params, h: jax.Array, num_frames: int, dtype: jnp.dtype) -> jax.Array:
    """[B, T, D] -> [B, num_frames, D]: projection to ``D * squeeze_factor`` and the feature activation, each frame's
    channels unfolded into ``squeeze_factor`` frames, zeros after (the frames the squeeze's partial window lost)."""
    h = activation(cfg.feat_extract_activation)(dense(p, h, dtype))
    B, T, _ = h.shape
    h = h.reshape(B, T * cfg.squeeze_factor, -1)
    return jnp.pad(h, ((0, 0), (0, num_frames - h.shape[1]), (0, 0)))


def check_squeeze(cfg: SEWConfig, num_samples: int) -> None:
    """Audio that gives fewer frames than ``squeeze_factor`` leaves the layers nothing to run on: a one-line
    ``InputError`` (transformers returns all-zero frames for it)."""
    frames = int(wav2vec2.output_lengths(cfg, num_samples, with_adapter=False))
    if frames < cfg.squeeze_factor:
        need = wav2vec2.receptive_field(cfg) + (cfg.squeeze_factor - 1) * math.prod(cfg.conv_stride)
        raise InputError(f"input_values: audio of {num_samples} samples gives {frames} frame(s), fewer than "
                         f"squeeze_factor {cfg.squeeze_factor}; the encoder needs at least {need} samples")


def features(cfg: SEWConfig, p: Params, input_values: jax.Array, attention_mask: jax.Array | None, *,
             rng: jax.Array | None, dtype: jnp.dtype, eps: float) -> tuple[jax.Array, jax.Array | None]:
    """What the squeeze takes: audio [B, N] (+ sample mask [B, N]) -> (frames [B, S, hidden_size] with padding
    frames zeroed, frame mask [B, S] bool or None). The conv features' LayerNorm (epsilon ``eps``), the projection
    when there is one, its dropout and SpecAugment (time spans over the padded length)."""
    wav2vec2.check_audio(cfg, input_values, attention_mask)
    check_squeeze(cfg, input_values.shape[1])
    feats = wav2vec2.feature_encoder(cfg, p["feature_encoder"], input_values, dtype)
    fp = p["feature_projection"]
    h = layer_norm(fp["norm"], feats, eps)
    if cfg.project_features:
        h = dense(fp["proj"], h, dtype)
    h = dropout(h, cfg.feat_proj_dropout, fold(rng, _FEAT_PROJ))
    mask = None if attention_mask is None else frame_mask(cfg, attention_mask, h.shape[1])
    h = wav2vec2.spec_augment(cfg, p, h, mask, fold(rng, _SPEC_AUGMENT))
    if mask is not None:
        h = jnp.where(mask[:, :, None], h, 0)
    return h, mask


def encode(cfg: SEWConfig, p: Params, input_values: jax.Array, attention_mask: jax.Array | None, *,
           rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32,
           remat: str = "none", capture: bool = False) -> tuple:
    """Audio [B, N] (+ sample mask [B, N]) -> (frames [B, S, hidden_size], frame mask [B, S] bool or None), S the
    feature encoder's frame count. ``capture``: a third element, ``layers.core.Captured`` as transformers gives it:
    the squeezed frames [B, S // squeeze_factor, D] that enter the layers and each layer's output (before the
    upsampling), with each layer's attention probabilities.

    ``rng`` turns on training-mode regularisation as in ``wav2vec2.encode``: dropout after the (optional) feature
    projection, SpecAugment (time spans over the padded length), dropout after the squeeze's norm, and the layers'
    dropouts and LayerDrop. ``remat``: the layers' rematerialisation policy."""
    h, mask = features(cfg, p, input_values, attention_mask, rng=rng, dtype=dtype, eps=cfg.layer_norm_eps)
    S = h.shape[1]
    h, pooled_mask = squeeze(cfg, p["pos_conv"], h, mask)
    h = first = dropout(layer_norm(p["norm"], h, cfg.layer_norm_eps), cfg.hidden_dropout, fold(rng, _POS))
    h = wav2vec2.transformer_layers(cfg, p, h, pooled_mask, rng=rng, dtype=dtype, remat=remat, capture=capture)
    if capture:
        return upsample(cfg, p["upsample"], h[0], S, dtype), mask, captured(first, h[1])
    return upsample(cfg, p["upsample"], h, S, dtype), mask
