"""The wav2vec2 family of speech encoders (wav2vec2, hubert): conv feature encoder, positional conv, transformer, adapter.

HuBERT is a config variant: no adapter, optional norm before the feature projection, SpecAugment time spans over
the padded length. UniSpeech(-SAT), Data2VecAudio and WavLM are variants in files of their own that reuse this one's
functions (``parse_config``'s table, ``encode``'s positional embedding and attention). The module is an encoder
family as ``registry.EncoderFamily`` describes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from speechseq.config import (ACTIVATION, INT, INT_LIST, POSITIVE, REQUIRED, TEXT, EncoderConfig, HFField, number,
                              hf_dict_field, numbers, read_fields, require_heads)
from speechseq.errors import ConfigError, InputError
from speechseq.layers.core import (Captured, activation, block, captured, check_capture, dense, dropout, fold,
                                   keep_rows, layer_drop, layer_norm, mlp, multi_head_attention, on_mesh,
                                   remat as remat_fn, whole)
from speechseq.layers.spec_augment import apply_masks, spec_augment_masks
from speechseq.checkpoints.table import Rule, dense as dense_rules, norm as norm_rules, rule

Params = Mapping[str, jax.Array]
TORCH_NORM_EPS = 1e-5  # nn.LayerNorm / nn.GroupNorm default, used where transformers does not pass config eps


# ----------------------------------------------------------------------------------------------------------------------
# Config

INPUT_KIND = "waveform"  # raw 16 kHz samples [B, N] (input_values)


@dataclass(frozen=True)
class Wav2Vec2Config(EncoderConfig):
    """Wav2Vec2-family speech encoder (wav2vec2, hubert): raw 16 kHz audio in, frames out.

    The regularisation fields (transformers' names and semantics) act only when the apply gets a random key."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    conv_dim: tuple[int, ...]
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_bias: bool
    feat_extract_norm: str  # "group" (GroupNorm on the first conv only) or "layer" (LayerNorm on every conv)
    feat_extract_activation: str
    feat_proj_layer_norm: bool
    stable_layer_norm: bool  # pre-norm layers and a final norm (large models) instead of post-norm
    num_conv_pos_embeddings: int
    num_conv_pos_embedding_groups: int
    layer_norm_eps: float
    add_adapter: bool
    output_hidden_size: int
    num_adapter_layers: int
    adapter_stride: int
    adapter_kernel_size: int
    masked_spec_embed: bool  # the checkpoint carries the SpecAugment mask embedding
    # time spans drawn within each row's real length (wav2vec2); HuBERT's model passes no attention mask to its
    # SpecAugment, so its spans range over the padded length
    spec_augment_lengths: bool = True
    # LayerDrop may skip the first layer (WavLM's first layer makes the position bias, so transformers never skips it)
    layerdrop_first_layer: bool = True
    hidden_dropout: float = 0.0  # after the positional conv, after attention, after the feed-forward
    attention_dropout: float = 0.0  # on attention probabilities
    activation_dropout: float = 0.0  # after the feed-forward activation
    feat_proj_dropout: float = 0.0  # after the feature projection
    layerdrop: float = 0.0  # probability of skipping a transformer layer
    # SpecAugment after the feature projection (``layers.spec_augment``): time spans take masked_spec_embed,
    # feature channels are zeroed
    apply_spec_augment: bool = True
    mask_time_prob: float = 0.0
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    hf: dict = hf_dict_field()

    @property
    def output_size(self) -> int:
        """Width of the frames that leave the encoder (after the adapter, when there is one)."""
        return self.output_hidden_size if self.add_adapter else self.hidden_size

    def describe(self) -> str:
        adapter = (f", adapter {self.num_adapter_layers} x stride {self.adapter_stride} -> {self.output_hidden_size}"
                   if self.add_adapter else "")
        return super().describe() + adapter


Config = Wav2Vec2Config  # the family's config class (registry)

# Typed fields under transformers' own names and defaults (Wav2Vec2Config, HubertConfig): read and written back.
# final_dropout is left in ``hf``: only the CTC / classification heads apply it, not the bare model seq2seq uses.
FIELDS = (
    HFField("hidden_size", "hidden_size", REQUIRED, INT),
    HFField("num_layers", "num_hidden_layers", REQUIRED, INT),
    HFField("num_heads", "num_attention_heads", REQUIRED, INT),
    HFField("intermediate_size", "intermediate_size", REQUIRED, INT),
    HFField("hidden_act", "hidden_act", "gelu", ACTIVATION),
    HFField("conv_dim", "conv_dim", REQUIRED, INT_LIST),
    HFField("conv_kernel", "conv_kernel", REQUIRED, INT_LIST),
    HFField("conv_stride", "conv_stride", REQUIRED, INT_LIST),
    HFField("conv_bias", "conv_bias", False, None),
    HFField("feat_extract_norm", "feat_extract_norm", "group", TEXT),
    HFField("feat_extract_activation", "feat_extract_activation", "gelu", ACTIVATION),
    HFField("feat_proj_layer_norm", "feat_proj_layer_norm", True, None),
    HFField("stable_layer_norm", "do_stable_layer_norm", False, None),
    HFField("num_conv_pos_embeddings", "num_conv_pos_embeddings", 128, INT),
    HFField("num_conv_pos_embedding_groups", "num_conv_pos_embedding_groups", 16, INT),
    HFField("layer_norm_eps", "layer_norm_eps", 1e-5, POSITIVE),
    HFField("add_adapter", "add_adapter", False, None),
    HFField("output_hidden_size", "output_hidden_size", lambda hf: hf["hidden_size"], INT),  # None: hidden_size
    HFField("num_adapter_layers", "num_adapter_layers", 3, dict(low=0)),
    HFField("adapter_stride", "adapter_stride", 2, INT),
    HFField("adapter_kernel_size", "adapter_kernel_size", 3, INT),
    HFField("hidden_dropout", "hidden_dropout", 0.1),
    HFField("attention_dropout", "attention_dropout", 0.1),
    HFField("activation_dropout", "activation_dropout", 0.1),
    HFField("feat_proj_dropout", "feat_proj_dropout", 0.0),
    HFField("layerdrop", "layerdrop", 0.1),
    HFField("apply_spec_augment", "apply_spec_augment", True, None),
    HFField("mask_time_prob", "mask_time_prob", 0.05),
    HFField("mask_time_length", "mask_time_length", 10, {}),
    HFField("mask_time_min_masks", "mask_time_min_masks", 2, dict(low=0)),
    HFField("mask_feature_prob", "mask_feature_prob", 0.0),
    HFField("mask_feature_length", "mask_feature_length", 10, {}),
    HFField("mask_feature_min_masks", "mask_feature_min_masks", 0, dict(low=0)),
)


def parse_config(hf: dict, where: str, *, table: tuple[HFField, ...] = FIELDS, fixed: Mapping | None = None,
                 cls: type[Wav2Vec2Config] = Wav2Vec2Config) -> Wav2Vec2Config:
    """A HF config dict -> ``cls``. Variants of the family (``encoders/unispeech.py``, ``data2vec_audio.py``,
    ``wavlm.py``) pass their own field ``table`` and the values their transformers class fixes (``fixed``, e.g.
    no adapter), which then also win over the derived ones."""
    mt = hf["model_type"]
    for key, bad in (("adapter_attn_dim", None), ("conv_pos_batch_norm", False)):
        if hf.get(key, bad) != bad:
            raise ConfigError(f"{where}: option {key}={hf[key]!r} is not supported for {mt} (supported: {bad!r})")
    conv_dim, conv_kernel, conv_stride = (numbers(hf, k, where) for k in ("conv_dim", "conv_kernel", "conv_stride"))
    if not len(conv_dim) == len(conv_kernel) == len(conv_stride):
        raise ConfigError(f"{where}: conv_dim, conv_kernel and conv_stride must have the same length, got "
                          f"{len(conv_dim)}, {len(conv_kernel)}, {len(conv_stride)}")
    norm = hf.get("feat_extract_norm", "group")
    if norm not in ("group", "layer"):
        raise ConfigError(f"{where}: feat_extract_norm {norm!r} is not supported; supported: 'group', 'layer'")
    hidden, _ = require_heads(hf, "hidden_size", "num_attention_heads", where)
    groups = number(hf, "num_conv_pos_embedding_groups", where, 16)
    if hidden % groups:  # the positional conv is grouped over the width
        raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_conv_pos_embedding_groups {groups}")
    fields = read_fields(hf, table, where)  # the checks above come first, with their own messages
    values = dict(
        model_type=mt,
        # transformers makes the mask embedding whenever either SpecAugment probability is above 0
        masked_spec_embed=max(fields["mask_time_prob"], fields["mask_feature_prob"]) > 0,
        spec_augment_lengths=mt != "hubert",
        **fields,
    )
    values.update(fixed or {})
    return cls(**values, hf=hf)


# ----------------------------------------------------------------------------------------------------------------------
# Weight table (names relative to Wav2Vec2Model / HubertModel; ``{base}`` is "" or "wav2vec2." / "hubert.")


def weight_rules(cfg: Wav2Vec2Config) -> list[Rule]:
    D, L, F = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    K, G = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
    out: list[Rule] = []
    if cfg.masked_spec_embed:
        out.append(rule("{base}masked_spec_embed", "masked_spec_embed", (D,), ("embed",), init="ones"))
    c_in = 1
    for j, (c, k) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel)):
        hf, path = f"{{base}}feature_extractor.conv_layers.{j}", f"feature_encoder/conv{j}"
        out.append(rule(f"{hf}.conv.weight", f"{path}/kernel", (k, c_in, c), (None, None, "conv_out"),
                        layout="conv", init="conv"))
        if cfg.conv_bias:
            out.append(rule(f"{hf}.conv.bias", f"{path}/bias", (c,), ("conv_out",), init="zeros"))
        if cfg.feat_extract_norm == "layer" or j == 0:
            out += norm_rules(f"{hf}.layer_norm", f"{path}/norm", c, axis="conv_out")
        c_in = c
    if cfg.feat_proj_layer_norm:
        out += norm_rules("{base}feature_projection.layer_norm", "feature_projection/norm", c_in, axis="conv_out")
    out += dense_rules("{base}feature_projection.projection", "feature_projection/proj", c_in, D, ("conv_out", "embed"))
    pos = "{base}encoder.pos_conv_embed.conv"
    out += [
        rule((f"{pos}.parametrizations.weight.original0", f"{pos}.weight_g"), "pos_conv/weight_g", (K, 1, 1),
             (None, None, None), layout="conv", init="weight_g"),
        rule((f"{pos}.parametrizations.weight.original1", f"{pos}.weight_v"), "pos_conv/weight_v", (K, D // G, D),
             (None, None, "embed"), layout="conv", init="conv"),
        rule(f"{pos}.bias", "pos_conv/bias", (D,), ("embed",), init="zeros"),
    ]
    out += norm_rules("{base}encoder.layer_norm", "norm", D)
    lay = "{base}encoder.layers.{i}"
    for name, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        out += dense_rules(f"{lay}.attention.{hf}", f"layers/attn/{name}", D, D, ("embed", "heads"), layers=L)
    out += dense_rules(f"{lay}.attention.out_proj", "layers/attn/o", D, D, ("heads", "embed"), layers=L)
    out += norm_rules(f"{lay}.layer_norm", "layers/attn_norm", D, layers=L)
    out += dense_rules(f"{lay}.feed_forward.intermediate_dense", "layers/mlp/wi", D, F, ("embed", "mlp"), layers=L)
    out += dense_rules(f"{lay}.feed_forward.output_dense", "layers/mlp/wo", F, D, ("mlp", "embed"), layers=L)
    out += norm_rules(f"{lay}.final_layer_norm", "layers/mlp_norm", D, layers=L)
    if cfg.add_adapter:
        E = cfg.output_hidden_size
        if E != D:
            out += dense_rules("{base}adapter.proj", "adapter/proj", D, E, ("embed", "embed_out"))
            out += norm_rules("{base}adapter.proj_layer_norm", "adapter/proj_norm", E, axis="embed_out")
        out += [
            rule("{base}adapter.layers.{i}.conv.weight", "adapter/layers/kernel", (cfg.adapter_kernel_size, E, 2 * E),
                 (None, "embed_out", "mlp"), layout="conv", init="conv", layers=cfg.num_adapter_layers),
            rule("{base}adapter.layers.{i}.conv.bias", "adapter/layers/bias", (2 * E,), ("mlp",), init="zeros",
                 layers=cfg.num_adapter_layers),
        ]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Lengths and masks, exactly as transformers computes them


def receptive_field(cfg: Wav2Vec2Config) -> int:
    """Fewest samples that give one frame."""
    n = 1
    for k, s in reversed(list(zip(cfg.conv_kernel, cfg.conv_stride))):
        n = (n - 1) * s + k
    return n


def output_lengths(cfg: Wav2Vec2Config, lengths: jax.Array, with_adapter: bool) -> jax.Array:
    """Frames produced from ``lengths`` samples (HF counts adapter convs with kernel 1, whatever their kernel)."""
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        lengths = (lengths - k) // s + 1
    if with_adapter:
        for _ in range(cfg.num_adapter_layers):
            lengths = (lengths - 1) // cfg.adapter_stride + 1
    return lengths


def frame_mask(cfg: Wav2Vec2Config, attention_mask: jax.Array, num_frames: int,
               with_adapter: bool | None = None) -> jax.Array:
    """Sample mask [B, N] -> frame mask [B, S] bool (transformers' ``_get_feature_vector_attention_mask``).

    ``with_adapter=None`` counts the adapter when the encoder has one: the mask of the encoder's output frames.
    """
    if with_adapter is None:
        with_adapter = cfg.add_adapter
    lengths = output_lengths(cfg, attention_mask.astype(jnp.int32).sum(-1), with_adapter)
    last = jnp.mod(lengths - 1, num_frames)  # a length of 0 marks the last frame, as transformers' indexing does
    return jnp.arange(num_frames)[None, :] <= last[:, None]


# ----------------------------------------------------------------------------------------------------------------------
# Compute


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int | tuple = 0, groups: int = 1) -> jax.Array:
    """1-D convolution, x [B, S, Cin], kernel [K, Cin/groups, Cout] -> [B, S', Cout]."""
    pad = [(padding, padding)] if isinstance(padding, int) else [padding]
    kernel = kernel.astype(x.dtype)
    if groups > 1 and on_mesh():  # XLA's SPMD partitioner gathers the batch's rows for a grouped convolution
        return jnp.concatenate([_conv(xg, kg, stride, padding) for xg, kg in
                                zip(jnp.split(x, groups, -1), jnp.split(kernel, groups, -1))], -1)
    return jax.lax.conv_general_dilated(x, kernel, (stride,), pad, dimension_numbers=("NWC", "WIO", "NWC"),
                                        feature_group_count=groups)


CHUNK_BYTES = 32 * 2**20  # feature_encoder's budget for the first conv's output of one window


def feature_encoder(cfg: Wav2Vec2Config, p: Params, audio: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Raw audio [B, N] -> conv features [B, S, C].

    With per-frame layer norms (``feat_extract_norm="layer"``) a frame depends only on its receptive field, so
    long audio runs through the conv stack in overlapping windows of whole frames, one after another (``lax.map``):
    the first conv's output (B x N/5 x 512 values, the encoder's largest tensor, 131 MB for four 5 s clips) then
    never exists whole, which measured 10-15% faster for the conv stack on 2 CPU cores (fewer page faults and DRAM
    passes for its norm and activation) and bounds the memory on any device. Frames are the same up to float
    rounding. Differentiated, it runs whole (``_windowed_conv_stack``).
    """
    B, N = audio.shape
    hop = math.prod(cfg.conv_stride)
    frames = output_lengths(cfg, N, with_adapter=False)
    frame_bytes = B * (hop // cfg.conv_stride[0]) * cfg.conv_dim[0] * jnp.dtype(dtype).itemsize
    windows = -(-frames // max(1, CHUNK_BYTES // frame_bytes))
    if cfg.feat_extract_norm != "layer" or windows < 2:
        return _conv_stack(cfg, p, audio, dtype)
    return _windowed_conv_stack(cfg, dtype, windows, p, audio)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _windowed_conv_stack(cfg: Wav2Vec2Config, dtype: jnp.dtype, windows: int, p: Params,
                         audio: jax.Array) -> jax.Array:
    """``_conv_stack`` in ``windows`` windows of whole frames (``feature_encoder``): [B, N] -> [B, S, C].

    Its gradient is the whole stack's (the forward of a differentiated call runs whole too): backward through
    ``lax.map`` stacks every window's residuals anyway, and XLA CPU runs the convolutions' transposes inside the
    loop ~100x slower (base size, batch 4 x 5 s: 340 s against 2.6 s whole)."""
    B, N = audio.shape
    hop, field = math.prod(cfg.conv_stride), receptive_field(cfg)
    frames = output_lengths(cfg, N, with_adapter=False)
    per = -(-frames // windows)  # frames per window
    width = (per - 1) * hop + field  # samples per window
    padded = jnp.pad(audio, ((0, 0), (0, max(0, (windows - 1) * per * hop + width - N))))
    out = jax.lax.map(lambda i: _conv_stack(cfg, p, jax.lax.dynamic_slice_in_dim(padded, i * per * hop, width, 1),
                                            dtype), jnp.arange(windows))  # [W, B, per, C]
    return jnp.moveaxis(out, 0, 1).reshape(B, windows * per, -1)[:, :frames]


def _windowed_conv_stack_fwd(cfg: Wav2Vec2Config, dtype: jnp.dtype, windows: int, p, audio):
    # symbolic zeros: ``perturbed`` says which inputs are differentiated (only the params, in training)
    params = jax.tree.map(lambda x: x.value, p)
    if audio.perturbed:
        return jax.vjp(lambda p, a: _conv_stack(cfg, p, a, dtype), params, audio.value)
    return jax.vjp(lambda p: _conv_stack(cfg, p, audio.value, dtype), params)


def _windowed_conv_stack_bwd(cfg: Wav2Vec2Config, dtype: jnp.dtype, windows: int, vjp, ct: jax.Array):
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):  # the features do not reach the differentiated output
        ct = jnp.zeros(ct.shape, ct.dtype)
    # what the backward pass computes from the residuals alone (e.g. transposed copies for the kernels' gradients,
    # each as large as a conv's output) waits for the cotangent: else XLA schedules it during the forward pass, while
    # the encoder's activations are all held (base size, batch 4 x 5 s: 256 MB more at the step's peak)
    ct, vjp = jax.lax.optimization_barrier((ct, vjp))
    grads = vjp(ct)
    return grads if len(grads) == 2 else (grads[0], None)


_windowed_conv_stack.defvjp(_windowed_conv_stack_fwd, _windowed_conv_stack_bwd, symbolic_zeros=True)


def _conv_stack(cfg: Wav2Vec2Config, p: Params, audio: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Raw audio [B, N] -> conv features [B, S, C], in one piece."""
    act = activation(cfg.feat_extract_activation)
    h = audio[:, :, None].astype(dtype)
    for j, s in enumerate(cfg.conv_stride):
        cp = p[f"conv{j}"]
        h = _conv(h, cp["kernel"], s)
        if "bias" in cp:
            h = h + cp["bias"].astype(dtype)
        if cfg.feat_extract_norm == "layer":
            h = layer_norm(cp["norm"], h, TORCH_NORM_EPS)
        elif j == 0:  # GroupNorm with one group per channel: statistics over time
            hf = h.astype(jnp.float32)
            mean = hf.mean(1, keepdims=True)
            var = jnp.square(hf - mean).mean(1, keepdims=True)
            h = ((hf - mean) * jax.lax.rsqrt(var + TORCH_NORM_EPS) * cp["norm"]["scale"] + cp["norm"]["bias"]).astype(dtype)
        h = act(h)
    return h


def positional_conv(cfg: Wav2Vec2Config, p: Params, h: jax.Array) -> jax.Array:
    """Weight-normed grouped conv over time, [B, S, D] -> [B, S, D]."""
    v = p["weight_v"].astype(jnp.float32)
    w = p["weight_g"] * v * jax.lax.rsqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
    k = cfg.num_conv_pos_embeddings
    # an even kernel: transformers pads k // 2 on both sides and drops the last frame; padding one less on the
    # right gives the same frames
    # on a mesh the rows stay split and the small kernel is gathered (XLA would gather the batch's rows instead)
    y = grouped_conv(keep_rows(h), whole(w).astype(h.dtype), (k // 2, (k - 1) // 2), cfg.num_conv_pos_embedding_groups)
    return activation(cfg.feat_extract_activation)(keep_rows(y) + p["bias"].astype(h.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def grouped_conv(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int) -> jax.Array:
    """Stride-1 grouped 1-D convolution, x [B, S, Cin], kernel [K, Cin/groups, Cout] -> [B, S + pad - K + 1, Cout].

    XLA's own convolution, with the kernel's gradient as batched matmuls (``_grouped_conv_kernel_grad``): XLA
    differentiates a grouped convolution w.r.t. its kernel as a batch-grouped convolution, which XLA CPU runs ~20x
    slower than the forward (the positional conv of a base-size encoder, batch 4 x 5 s: 4.1 s against 0.17 s)."""
    return _conv(x, kernel, 1, padding, groups)


def _grouped_conv_fwd(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], groups: int):
    return grouped_conv(x, kernel, padding, groups), (x, kernel)


def _grouped_conv_bwd(padding: tuple[int, int], groups: int, res: tuple[jax.Array, jax.Array], ct: jax.Array):
    x, kernel = res
    _, input_grad = jax.vjp(lambda x: _conv(x, kernel, 1, padding, groups), x)  # a grouped convolution itself
    return input_grad(ct)[0], _grouped_conv_kernel_grad(x, ct, kernel.shape[0], padding, groups).astype(kernel.dtype)


def _grouped_conv_kernel_grad(x: jax.Array, ct: jax.Array, size: int, padding: tuple[int, int],
                              groups: int) -> jax.Array:
    """d(loss)/d(kernel) [K, Cin/G, Cout] of ``grouped_conv`` from its input x [B, S, Cin] and output cotangent
    ct [B, T, Cout]: kernel row k is, per group g, sum over (b, t) of x_padded[b, t + k, g, :]^T ct[b, t, g, :],
    one batched matmul over the groups per row (``lax.map`` over the K rows, so no [B, T, K, Cin] patches)."""
    B, T, Cout = ct.shape
    G = groups
    xg = jnp.pad(x, ((0, 0), padding, (0, 0))).reshape(B, -1, G, x.shape[-1] // G).transpose(2, 0, 1, 3)
    cg = ct.reshape(B, T, G, Cout // G).transpose(2, 0, 1, 3)  # [G, B, T, O]

    def row(k: jax.Array) -> jax.Array:  # [Cin/G, G, O]
        window = jax.lax.dynamic_slice_in_dim(xg, k, T, 2)  # [G, B, T, Cin/G]
        # per utterance, then summed: a contraction over the batch axis itself would have no defined output
        # sharding when the batch is sharded over a mesh with explicit axes
        per_row = jnp.einsum("gbtc,gbto->gbco", window, cg, preferred_element_type=jnp.float32)
        return jnp.transpose(per_row.sum(axis=1), (1, 0, 2))

    return jax.lax.map(row, jnp.arange(size)).reshape(size, -1, Cout)


grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


def adapter(cfg: Wav2Vec2Config, p: Params, h: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[B, S, D] -> [B, S', output_hidden_size]: optional projection, then strided GLU convs."""
    if "proj" in p:
        h = layer_norm(p["proj_norm"], dense(p["proj"], h, dtype), TORCH_NORM_EPS)
    for i in range(cfg.num_adapter_layers):  # lengths shrink per layer, so no scan
        h = _conv(h, p["layers"]["kernel"][i], cfg.adapter_stride, 1) + p["layers"]["bias"][i].astype(dtype)
        h = jax.nn.glu(h, axis=-1)
    return h


def check_audio(cfg: Wav2Vec2Config, input_values: jax.Array, attention_mask: jax.Array | None) -> None:
    """Static checks on shapes and dtypes, raised at trace time as one-line errors."""
    if input_values.ndim != 2:
        raise InputError(f"input_values: expected rank 2 [batch, samples], got shape {tuple(input_values.shape)}")
    if not jnp.issubdtype(input_values.dtype, jnp.floating):
        raise InputError(f"input_values: expected a float array of audio samples, got dtype {input_values.dtype}")
    need = receptive_field(cfg)
    if input_values.shape[1] < need:
        raise InputError(f"input_values: audio of {input_values.shape[1]} samples is too short; the encoder needs at "
                         f"least {need} samples for one frame")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_values.shape):
        raise InputError(f"attention_mask: expected shape {tuple(input_values.shape)} like input_values, "
                         f"got {tuple(attention_mask.shape)}")


# Fixed ids of the random sites (``fold``): the same key gives the same masks at the same place.
_FEAT_PROJ, _POS, _LAYERS, _SPEC_AUGMENT = 0, 1, 2, 3  # encoder-wide
_ATTN_PROBS, _ATTN_OUT, _ACT, _MLP_OUT, _LAYERDROP = range(5)  # per layer


def spec_augment(cfg: Wav2Vec2Config, p: Params, h: jax.Array, mask: jax.Array | None,
                 rng: jax.Array | None) -> jax.Array:
    """SpecAugment on the projected features [B, S, D] (frame mask [B, S] or None) in training mode (a key and
    ``apply_spec_augment``): time spans take ``masked_spec_embed``, feature channels are zeroed
    (``layers.spec_augment``, as transformers' ``_mask_hidden_states``)."""
    if rng is None or not cfg.apply_spec_augment:
        return h
    if cfg.mask_time_prob > 0 and not cfg.masked_spec_embed:  # only a dataclasses.replace can make this config
        raise ConfigError(f"{cfg.model_type}: mask_time_prob {cfg.mask_time_prob} needs the masked_spec_embed weight, "
                          "which this config was made without (masked_spec_embed=False); parse it from a config "
                          "dict that sets mask_time_prob")
    lengths = mask.sum(-1) if mask is not None and cfg.spec_augment_lengths else None
    time, feature = spec_augment_masks(
        rng, h.shape, lengths, mask_time_prob=cfg.mask_time_prob, mask_time_length=cfg.mask_time_length,
        mask_time_min_masks=cfg.mask_time_min_masks, mask_feature_prob=cfg.mask_feature_prob,
        mask_feature_length=cfg.mask_feature_length, mask_feature_min_masks=cfg.mask_feature_min_masks)
    return apply_masks(h, time, feature, p.get("masked_spec_embed"))


# One layer's self-attention as ``encode`` calls it: (the layer's "attn" params, x [B, S, D], key mask [B, 1, 1, S]
# bool or None, dropout key or None, return_probs) -> [B, S, D], before the residual's dropout; with return_probs
# True, (that, the attention probabilities [B, N, S, S] transformers returns for ``output_attentions``).
SelfAttention = Callable[[Params, jax.Array, jax.Array | None, jax.Array | None, bool],
                         jax.Array | tuple[jax.Array, jax.Array]]


def self_attention(cfg: Wav2Vec2Config, p: Params, num_frames: int, dtype: jnp.dtype) -> SelfAttention:
    """Plain multi-head self-attention with attention dropout (``encode``'s default ``attention``)."""
    def attend(lp: Params, x: jax.Array, mask: jax.Array | None, rng: jax.Array | None,
               return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        return multi_head_attention(lp, x, x, mask, cfg.num_heads, dtype, dropout_rate=cfg.attention_dropout, rng=rng,
                                    return_probs=return_probs)

    return attend


def transformer_layers(cfg: Wav2Vec2Config, p: Params, h: jax.Array, mask: jax.Array | None, *,
                       rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32, remat: str = "none",
                       attention: Callable[[Wav2Vec2Config, Params, int, jnp.dtype], SelfAttention] = self_attention,
                       capture: bool = False) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The transformer layers (``p["layers"]``, stacked, under ``lax.scan``): [B, S, D] (+ frame mask [B, S] bool or
    None) -> [B, S, D], pre-norm when ``cfg.stable_layer_norm``, post-norm otherwise. ``rng``: the encoder's key
    (each layer folds its own ids); ``remat`` and ``attention`` as ``encode`` describes them. SEW runs it between its
    squeeze and its upsampling. ``capture``: also return each layer's (output [L, B, S, D], attention probabilities
    [L, B, N, S, S]) as scan outputs (``layers.core.captured``)."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    eps, pre = cfg.layer_norm_eps, cfg.stable_layer_norm
    self_attend = attention(cfg, p, h.shape[1], dtype)
    if capture:
        check_capture(cfg.layerdrop, rng, "encoder")

    def layer(h: jax.Array, xs: tuple[Params, jax.Array]) -> tuple[jax.Array, tuple | None]:
        lp, i = xs
        lr = fold(rng, _LAYERS, i)
        probs = None

        def attend(x: jax.Array) -> jax.Array:
            nonlocal probs
            out = self_attend(lp["attn"], x, attn_mask, fold(lr, _ATTN_PROBS), capture)
            if capture:
                out, probs = out
            return dropout(out, cfg.hidden_dropout, fold(lr, _ATTN_OUT))

        def feed_forward(x: jax.Array) -> jax.Array:
            out = mlp(lp["mlp"], x, cfg.hidden_act, dtype, cfg.activation_dropout, fold(lr, _ACT))
            return dropout(out, cfg.hidden_dropout, fold(lr, _MLP_OUT))

        def run(h: jax.Array) -> jax.Array:
            h = block(h, lp["attn_norm"], attend, pre, eps)
            return block(h, lp["mlp_norm"], feed_forward, pre, eps)

        def droppable(h: jax.Array) -> jax.Array:
            return layer_drop(run, h, cfg.layerdrop, fold(lr, _LAYERDROP))

        if capture:  # no LayerDrop then (check_capture): ``run`` runs here, not under a cond, and sets ``probs``
            h = run(h)
            return h, (h, probs)
        if cfg.layerdrop_first_layer or rng is None or cfg.layerdrop == 0:
            return droppable(h), None
        return jax.lax.cond(i == 0, run, droppable, h), None

    h, per_layer = jax.lax.scan(remat_fn(layer, remat), h, (p["layers"], jnp.arange(cfg.num_layers)))
    return (h, per_layer) if capture else h


def encode(cfg: Wav2Vec2Config, p: Params, input_values: jax.Array, attention_mask: jax.Array | None, *,
           rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32, remat: str = "none",
           positional: Callable[[Wav2Vec2Config, Params, jax.Array], jax.Array] = positional_conv,
           attention: Callable[[Wav2Vec2Config, Params, int, jnp.dtype], SelfAttention] = self_attention,
           capture: bool = False) -> tuple[jax.Array, jax.Array | None] | tuple[jax.Array, jax.Array | None, Captured]:
    """Audio [B, N] (+ sample mask [B, N]) -> (frames [B, S, output_size], frame mask [B, S] bool or None), and with
    ``capture`` a third element, transformers' ``hidden_states`` and ``attentions`` (``layers.core.Captured``): the
    first layer's input, then each layer's output as it leaves the layer (transformers 5's hooks: a stable-layer-norm
    encoder's final norm is in none of them), all before the adapter.

    ``rng`` (a ``jax.random`` key) turns on transformers' training-mode regularisation: dropout after the feature
    projection (``feat_proj_dropout``), SpecAugment after it (``apply_spec_augment``, ``mask_time_*``,
    ``mask_feature_*``), dropout after the positional embedding, the attention output and the feed-forward
    (``hidden_dropout``), on attention probabilities (``attention_dropout``), after the feed-forward activation
    (``activation_dropout``), and LayerDrop over the transformer layers (``layerdrop``). None: eval mode.
    ``remat``: the transformer layers' rematerialisation policy (``layers.core.remat``).
    Variants of the family replace two parts: ``positional(cfg, p["pos_conv"], h)`` the positional embedding
    [B, S, D] (default ``positional_conv``; Data2VecAudio's conv stack), ``attention(cfg, p, S, dtype)`` each
    layer's self-attention (default ``self_attention``; WavLM's gated relative position bias).
    """
    check_audio(cfg, input_values, attention_mask)
    feats = feature_encoder(cfg, p["feature_encoder"], input_values, dtype)
    fp = p["feature_projection"]
    h = layer_norm(fp["norm"], feats, cfg.layer_norm_eps) if cfg.feat_proj_layer_norm else feats
    h = dropout(dense(fp["proj"], h, dtype), cfg.feat_proj_dropout, fold(rng, _FEAT_PROJ))
    mask = None if attention_mask is None else frame_mask(cfg, attention_mask, h.shape[1], with_adapter=False)
    h = spec_augment(cfg, p, h, mask, fold(rng, _SPEC_AUGMENT))
    if mask is not None:
        h = jnp.where(mask[:, :, None], h, 0)
    h = h + positional(cfg, p["pos_conv"], h)
    if not cfg.stable_layer_norm:
        h = layer_norm(p["norm"], h, cfg.layer_norm_eps)
    h = first = dropout(h, cfg.hidden_dropout, fold(rng, _POS))
    h = transformer_layers(cfg, p, h, mask, rng=rng, dtype=dtype, remat=remat, attention=attention, capture=capture)
    if capture:
        h, per_layer = h
    if cfg.stable_layer_norm:
        h = layer_norm(p["norm"], h, cfg.layer_norm_eps)
    if cfg.add_adapter:
        # transformers' adapter also skips whole adapter layers with probability layerdrop (np.random): not done
        # here, since a skipped strided conv changes the number of frames, which must be static under jit
        h = adapter(cfg, p["adapter"], h, dtype)
    if attention_mask is not None:
        mask = frame_mask(cfg, attention_mask, h.shape[1], with_adapter=cfg.add_adapter)
    return (h, mask, captured(first, per_layer)) if capture else (h, mask)
