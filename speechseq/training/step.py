"""The training step as a pure function ``train_step(state, batch) -> (state, metrics)``, jitted with the state's
buffers donated, for the loop in ``speechseq.training.loop`` or a user's own:

    state = init_state(model.config, model.params, OptimConfig(learning_rate=3e-4, warmup_steps=500), seed=0)
    train_step = make_train_step(model.config, optim, StepConfig(accum_steps=4, remat="layer"))
    for batch in batches:
        state, metrics = train_step(state, batch)     # metrics: loss, tokens, grad_norm, learning_rate

A batch is a dict of arrays with a leading batch axis B: "input_values" [B, N] float32 (or "input_features"),
"attention_mask" [B, N] (optional) and "labels" [B, T] int (-100 = ignored); other keys (a loader's "ids") are
left out. The loss is the token-weighted mean cross-entropy over the whole batch, however many microbatches it is
cut into, so accumulation equals one large batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend.core import Var

from speechseq import model as M
from speechseq.checkpoints.table import flatten, unflatten
from speechseq.config import SpeechSeq2SeqConfig, check_number
from speechseq.errors import ConfigError, InputError
from speechseq.layers.core import REMAT_POLICIES, fold, rows_sharding
from speechseq.training import ctc
from speechseq.training.optim import OptimConfig, learning_rate_schedule, merge, optimizer, partition

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
DTYPES = ("float32", "bfloat16")
AUDIO_KEYS = ("input_values", "input_features")  # the encoder's input: one of them, whichever the encoder reads


@dataclass(frozen=True)
class StepConfig:
    """How a step computes (static: a change compiles a new step).

    ``dtype``: compute dtype ("float32" or "bfloat16"); params, gradients and optimizer state stay float32.
    ``remat``: the layers' rematerialisation policy ("none", "layer", "dots"; ``layers.core.remat``).
    ``accum_steps``: microbatches per step (the batch axis must divide by it), run one after another under
    ``lax.scan`` with gradients summed, each weighted by its share of the batch's label tokens.
    ``label_smoothing``: the epsilon of transformers ``Trainer``'s ``LabelSmoother`` (0: plain cross-entropy).
    ``dropout``: False runs the forward in eval mode (no dropout, LayerDrop or SpecAugment) while training.
    ``ctc_weight``: w of an auxiliary CTC loss on the encoder frames (``training.ctc``): the step minimises
    ``(1 - w) * attention + w * CTC`` per label token, with a CTC head in ``params["ctc"]`` (``ctc.init_head``)
    that is trained but never saved with the model; 0: none, the objective transformers' model computes.
    ``token_noise``: the fraction p of decoder input tokens after the start token that, while training, are replaced by
    tokens drawn uniformly from the vocabulary (``noisy_decoder_inputs``; the labels stay right), so the decoder
    learns to follow the audio after a wrong token of its own instead of its text prior; 0: none.
    ``guided_attention``: weight g of a guided (diagonal) attention loss on the decoder's cross-attention
    (``guided_attention_sum``, Tachibana et al. 2018), added to the summed token loss: attention far from the
    diagonal of (label position / label count, frame / frame count) costs, so the decoder learns where in the audio
    it is and does not jump to a later (or back to an earlier) place that sounds the same; 0: none, the objective
    transformers' model computes. ``guided_attention_width``: the diagonal band's width (the Gaussian's sigma, in
    fractions of the utterance). ``guided_attention_heads``: the loss is on the first k heads of every layer (0:
    all): the penalty is linear in the probabilities, so it binds each head it covers; the others stay free to
    attend where the content is."""

    dtype: str = "float32"
    remat: str = "none"
    accum_steps: int = 1
    label_smoothing: float = 0.0
    dropout: bool = True
    ctc_weight: float = 0.0
    token_noise: float = 0.0
    guided_attention: float = 0.0
    guided_attention_width: float = 0.2
    guided_attention_heads: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"step.dtype: unknown compute dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"step.remat: unknown policy {self.remat!r}; choose one of {list(REMAT_POLICIES)}")
        check_number(self.accum_steps, "step.accum_steps", low=1)
        check_number(self.label_smoothing, "step.label_smoothing", integer=False, low=0, high=1)
        if not isinstance(self.dropout, bool):
            raise ConfigError(f"step.dropout should be true or false, got {self.dropout!r:.80}")
        check_number(self.ctc_weight, "step.ctc_weight", integer=False, low=0, high=1)
        check_number(self.token_noise, "step.token_noise", integer=False, low=0, high=1)
        check_number(self.guided_attention, "step.guided_attention", integer=False, low=0)
        check_number(self.guided_attention_width, "step.guided_attention_width", integer=False, low=1e-3, high=10)
        check_number(self.guided_attention_heads, "step.guided_attention_heads", low=0)


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the data position (a pytree of arrays).

    ``rng`` is a raw ``jax.random`` key (uint32 [2], ``jax.random.PRNGKey``), so checkpoints store it as a plain
    array; it never changes: step ``s`` draws its dropout masks from ``fold_in(rng, s)``, so a resumed run draws
    what an uninterrupted one does. ``opt_state`` covers only the trainable params (``optim.partition``)."""

    step: jax.Array  # int32 scalar: optimizer steps done
    params: Any  # float32 param tree (speechseq layout), frozen parts included
    opt_state: Any
    rng: jax.Array


def init_state(model_cfg: SpeechSeq2SeqConfig, params: Mapping, optim: OptimConfig, seed: int) -> TrainState:
    """A fresh state at step 0: a float32 copy of ``params`` (the step donates the state's buffers, so the caller's
    arrays, e.g. a ``SpeechSeq2Seq``'s, stay valid), AdamW moments at zero, the key of ``seed``."""
    check_number(seed, "seed", low=0)
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
    trainable, _ = partition(params, optim.freeze)
    opt_state = optimizer(model_cfg, optim).init(trainable)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Loss and gradient


def smoothed_cross_entropy_sum(logits: jax.Array, labels: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """transformers' ``LabelSmoother`` as a sum and a count: logits [B, T, V], labels [B, T] (-100 ignored) ->
    (sum over tokens of ``(1 - eps) * nll + eps * mean_v(-log p)``, number of tokens). Divided by the count it is
    ``LabelSmoother(epsilon)``'s loss; ``epsilon=0`` is ``model.cross_entropy_sum``."""
    nll, count = M.cross_entropy_sum(logits, labels)
    if epsilon == 0:
        return nll, count
    uniform = -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)  # [B, T]
    return (1 - epsilon) * nll + epsilon * jnp.sum(jnp.where(labels != -100, uniform, 0.0)), count


_TOKEN_NOISE = 2  # the random site of the decoder input noise (the model's forward folds in 0 and 1)


def noisy_decoder_inputs(model_cfg: SpeechSeq2SeqConfig, labels: jax.Array, p: float, rng: jax.Array) -> jax.Array:
    """The decoder inputs transformers makes of ``labels`` [B, T] (``model.shift_right``) with each position after
    the first replaced, with probability ``p``, by a token drawn uniformly from the decoder's vocabulary -> [B, T]
    int32. Padding positions stay padding (their loss is ignored either way)."""
    ids = M.shift_right(labels, model_cfg.pad_token_id, model_cfg.decoder_start_token_id)
    hit_key, token_key = jax.random.split(rng)
    hit = jax.random.bernoulli(hit_key, p, ids.shape) & (jnp.arange(ids.shape[1]) > 0) & (ids != model_cfg.pad_token_id)
    noise = jax.random.randint(token_key, ids.shape, 0, model_cfg.decoder.vocab_size, dtype=ids.dtype)
    return jnp.where(hit, noise, ids)


def guided_attention_sum(cross_attentions: tuple[jax.Array, ...], labels: jax.Array,
                         frame_mask: jax.Array | None, width: float, heads: int = 0) -> jax.Array:
    """Per-layer cross-attention probabilities [B, heads, T, S] -> float32 scalar: the sum over label tokens n of
    ``sum_s A[n, s] * (1 - exp(-((n + 1/2) / N - (s + 1/2) / S_b)^2 / (2 width^2)))``, A the mean over layers and
    their first ``heads`` heads (0: all), N the row's label count (labels [B, T], -100 ignored), S_b its valid
    frames (``frame_mask`` [B, S]; None: all S)."""
    a = jnp.stack([c[:, :heads or None].astype(jnp.float32) for c in cross_attentions])
    a = jnp.mean(a, axis=(0, 2))  # [B, T, S]
    valid = labels != -100
    tokens = jnp.maximum(valid.sum(1, keepdims=True), 1).astype(jnp.float32)
    frames = (jnp.full((a.shape[0], 1), a.shape[2], jnp.float32) if frame_mask is None
              else jnp.maximum(frame_mask.sum(1, keepdims=True), 1).astype(jnp.float32))
    n = (jnp.arange(a.shape[1]) + 0.5) / tokens  # [B, T]
    s = (jnp.arange(a.shape[2]) + 0.5) / frames  # [B, S]
    w = 1.0 - jnp.exp(-jnp.square(n[:, :, None] - s[:, None, :]) / (2.0 * width * width))
    return jnp.sum(a * w * valid[:, :, None])


def loss_sum(model_cfg: SpeechSeq2SeqConfig, params: Mapping, batch: Batch, step: StepConfig,
             rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One (micro)batch -> (summed token loss float32, label tokens int32); ``rng`` None: eval mode. With
    ``step.ctc_weight`` w > 0 the loss is ``(1 - w) * attention + w * CTC`` (``params`` carry the CTC head);
    ``step.guided_attention`` g > 0 adds g times ``guided_attention_sum``."""
    if step.ctc_weight and ctc.HEAD not in params:
        raise ConfigError("step.ctc_weight: the params have no CTC head; add training.ctc.init_head's")
    inputs = {k: batch[k] for k in AUDIO_KEYS if k in batch}  # forward refuses the kind the encoder does not read
    if step.token_noise and rng is not None:
        inputs["decoder_input_ids"] = noisy_decoder_inputs(model_cfg, batch["labels"], step.token_noise,
                                                           fold(rng, _TOKEN_NOISE))
    out = M.forward(model_cfg, ctc.model_params(params), attention_mask=batch.get("attention_mask"),
                    labels=batch["labels"], dtype=jnp.dtype(step.dtype), rng=rng, remat=step.remat,
                    output_attentions=bool(step.guided_attention), **inputs)
    total, count = smoothed_cross_entropy_sum(out.logits, batch["labels"], step.label_smoothing)
    if step.ctc_weight:
        ctc_sum = ctc.ctc_loss_sum(model_cfg, params[ctc.HEAD], out.encoder_last_hidden_state,
                                   out.encoder_attention_mask, batch["labels"])
        total = (1.0 - step.ctc_weight) * total + step.ctc_weight * ctc_sum
    if step.guided_attention:
        total = total + step.guided_attention * guided_attention_sum(
            out.cross_attentions, batch["labels"], out.encoder_attention_mask, step.guided_attention_width,
            step.guided_attention_heads)
    return total, count


def loss_and_grad(model_cfg: SpeechSeq2SeqConfig, step: StepConfig, trainable: Mapping, frozen: Mapping,
                  batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any]:
    """Mean token loss of ``batch`` and its gradient w.r.t. ``trainable`` only: (loss float32 scalar, label tokens
    int32 scalar, grads like ``trainable``). ``frozen`` (the rest of the params, ``optim.partition``) enters as a
    constant, so no gradient work is spent on it: autodiff differentiates only paths that reach ``trainable``.

    With ``step.accum_steps`` A > 1 the batch [B, ...] runs as A microbatches [B / A, ...] under ``lax.scan``; each
    adds the gradient of its summed loss divided by the whole batch's token count (counted first, from the labels),
    so the result is the one-large-batch mean's, not an average of per-microbatch means. Microbatch ``i`` draws
    dropout from ``fold_in(rng, i)``."""
    labels = batch["labels"]
    tokens = jnp.sum(labels != -100, dtype=jnp.int32)
    denom = jnp.maximum(tokens, 1).astype(jnp.float32)  # a batch without labels gives 0, not NaN
    frozen = jax.lax.stop_gradient(frozen)

    def micro(params: Mapping, mb: Batch, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        total, _ = loss_sum(model_cfg, merge(params, frozen), mb, step, key)
        return total / denom, total

    grad = jax.grad(micro, has_aux=True)
    A = step.accum_steps
    if A == 1:
        grads, total = grad(trainable, batch, fold(rng, 0))
    else:
        mbs = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), dict(batch))

        def body(carry: tuple[Any, jax.Array], xs: tuple[Batch, jax.Array]) -> tuple[tuple[Any, jax.Array], None]:
            acc, acc_total = carry
            mb, i = xs
            g, total = grad(trainable, mb, fold(rng, i))
            return (jax.tree.map(jnp.add, acc, g), acc_total + total), None

        zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32))
        (grads, total), _ = jax.lax.scan(body, zeros, (mbs, jnp.arange(A)))
    return total / denom, tokens, grads


def unread_params(fn: Callable[[Mapping], Any], params: Mapping) -> frozenset[str]:
    """Paths of the leaves of ``params`` that ``fn(params)`` never reads: no operation of its traced program takes
    them (traced again at trace time; nothing runs)."""
    program = jax.make_jaxpr(fn)(params).jaxpr
    read = {v for eqn in program.eqns for v in eqn.invars if isinstance(v, Var)}
    read |= {v for v in program.outvars if isinstance(v, Var)}
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return frozenset("/".join(str(k.key) for k in path) for (path, _), var in zip(leaves, program.invars)
                     if var not in read)


# ----------------------------------------------------------------------------------------------------------------------
# Steps


def check_batch(batch: Batch, accum_steps: int = 1) -> dict[str, Any]:
    """The arrays a step reads (encoder input, optional attention_mask, labels), with one-line errors for a batch
    that lacks them or whose batch axis does not split into ``accum_steps`` microbatches."""
    if not isinstance(batch, Mapping):
        raise InputError(f"batch: expected a dict of arrays, got {type(batch).__name__}")
    audio = [k for k in AUDIO_KEYS if batch.get(k) is not None]
    if len(audio) != 1:
        raise InputError(f"batch: expected exactly one of {list(AUDIO_KEYS)}, got {sorted(batch)}")
    if batch.get("labels") is None:
        raise InputError("batch: 'labels' [batch, tokens] are required (-100 marks ignored positions)")
    out = {k: batch[k] for k in (audio[0], "attention_mask", "labels") if batch.get(k) is not None}
    sizes = {k: v.shape[0] if getattr(v, "ndim", 0) else None for k, v in out.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise InputError(f"batch: arrays must share a leading batch axis, got sizes {sizes}")
    size = sizes["labels"]
    if size % accum_steps:
        raise InputError(f"batch: {size} examples do not split into accum_steps={accum_steps} equal microbatches")
    return out


def make_train_step(model_cfg: SpeechSeq2SeqConfig, optim: OptimConfig, step: StepConfig = StepConfig(), *,
                    shardings: tuple[Any, Any, Any] | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """``train_step(state, batch) -> (state, metrics)``: loss and gradient of the trainable params (``loss_and_grad``;
    dropout from ``fold_in(state.rng, state.step)`` unless ``step.dropout`` is False), torch's ``clip_grad_norm_``
    and AdamW with the Trainer's schedule (``optim.optimizer``); frozen params pass through bit for bit.

    Jitted with ``state`` donated (do not reuse a state after passing it). Metrics (float32 / int32 scalars):
    "loss" (token-weighted mean, label smoothing included), "tokens" (label tokens), "grad_norm" (global norm
    before clipping, as the Trainer logs it), "learning_rate" (the rate this step used). The jitted function
    itself (arrays in, no checks) is the returned function's ``jitted`` attribute, e.g. to ``lower`` it.

    ``shardings``: (state, batch, metrics) shardings for ``jax.jit``'s ``in_shardings`` / ``out_shardings``, to run
    the step on a device mesh (``speechseq.sharding.make_sharded_train_step`` derives them); None leaves placement
    to the inputs."""
    tx = optimizer(model_cfg, optim)
    rate = learning_rate_schedule(optim)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        trainable, frozen = partition(state.params, optim.freeze)
        rng = jax.random.fold_in(state.rng, state.step) if step.dropout else None
        with rows_sharding(None if shardings is None else shardings[1]):
            loss, tokens, grads = loss_and_grad(model_cfg, step, trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        # params this forward never reads (masked_spec_embed without SpecAugment): transformers leaves their grad
        # None and torch's AdamW skips them, weight decay included. Their grads are 0, so their moments stay 0.
        unread = unread_params(lambda p: loss_sum(model_cfg, merge(p, frozen), batch, step, rng), trainable)
        updates = unflatten({p: jnp.zeros_like(u) if p in unread else u for p, u in flatten(updates).items()})
        params = merge(optax.apply_updates(trainable, updates), frozen)
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": rate(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    placement = {} if shardings is None else dict(in_shardings=shardings[:2],
                                                  out_shardings=(shardings[0], shardings[2]))
    jitted = jax.jit(train_step, donate_argnums=0, **placement)

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return jitted(state, check_batch(batch, step.accum_steps))

    run.jitted = jitted  # type: ignore[attr-defined]
    return run


def make_eval_step(model_cfg: SpeechSeq2SeqConfig,
                   step: StepConfig = StepConfig()) -> Callable[[Mapping, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {"loss_sum", "tokens"}``: the training objective (label smoothing included, as
    the Trainer evaluates it; the CTC and guided attention terms left out) summed over the batch's label
    tokens, in eval mode (no dropout), in ``step.dtype``.
    Sum ``loss_sum`` and ``tokens`` over batches and divide for the token-weighted mean. Jitted; nothing donated."""

    step = dataclasses.replace(step, ctc_weight=0.0, guided_attention=0.0)

    @jax.jit
    def eval_step(params: Mapping, batch: Batch) -> dict[str, jax.Array]:
        total, tokens = loss_sum(model_cfg, params, batch, step)
        return {"loss_sum": total, "tokens": tokens}

    return lambda params, batch: eval_step(params, check_batch(batch))
