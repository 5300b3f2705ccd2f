"""The training step against transformers PyTorch on tiny perturbed models: loss and gradients of every encoder x
decoder pair equal ``loss.backward()`` (dropout off), AdamW steps with the Trainer's parameter groups, clipping and
schedule equal ``torch.optim.AdamW``, accumulated microbatches equal one large batch, frozen parts are neither
changed nor differentiated, remat and bfloat16 keep the numbers, dropout follows the state's key."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from transformers.trainer_pt_utils import LabelSmoother

import hf_factory as F
from conftest import XLA_DEFAULTS
from speechseq import model as M
from speechseq.checkpoints import table
from speechseq.encoders import wav2vec2
from speechseq.errors import ConfigError, InputError
from speechseq.training import OptimConfig, StepConfig, init_state, make_eval_step, make_train_step
from speechseq.training.optim import clip_grad_norm, decay_mask, learning_rate_schedule, partition
from speechseq.training.step import check_batch, loss_and_grad
from test_parity import contiguous_output

# Every decoder family with wav2vec2 and with HuBERT; the wav2vec2 / HuBERT variants and the scaled GPT-2 / BART
# vary over the pairs, so each family's variants are covered once.
PAIRS = [("w2v-group", "bert"), ("w2v-layer-stable", "roberta"), ("w2v-layer-post", "gpt2"),
         ("w2v-adapter-20", "bart"), ("w2v-oddpos", "mbart"), ("hubert", "bert"), ("hubert-noprojnorm", "roberta"),
         ("hubert", "gpt2-scaled"), ("hubert-noprojnorm", "bart-scaled"), ("hubert", "mbart")]
MODEL = ("w2v-adapter-20", "bart")  # the other tests' model: an adapter, a feature encoder, LayerDrop in both parts
GRAD_RTOL = 1e-5  # per tensor, times the tensor's max |grad|
FLOOR_FACTOR = 4  # or within this many times the case's fp32 noise floor (torch fp32 against torch float64)
# AdamW, warm-up (the first step's rate is 0), linear decay, weight decay and clipping all active within 3 steps
OPTIM = OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=6, weight_decay=0.1, max_grad_norm=1.0)
# a first step with a non-zero rate. Adam's first update, lr * g / (|g| + eps), is sign-like where |g| >> eps and
# blows rounding noise up by lr / eps where |g| ~ eps: with eps 1e-5 (not torch's 1e-8) a difference of a few percent
# in a gradient moves most params by far more than the test's slack, and rounding noise (~1e-10) by far less
ACCUM_OPTIM = dataclasses.replace(OPTIM, warmup_steps=0, adam_eps=1e-5)
EVAL_MODE = StepConfig(dropout=False)


def padded_batch(lengths=(1600, 1100), label_lengths=(7, 5), seed: int = 0) -> dict:
    """Audio padded to the longest with its sample mask, labels [B, 7] with -100 after each row's length."""
    x, mask = F.audio_batch(lengths, seed)
    labels = F.tokens(len(lengths), 7, seed).astype(np.int32)
    for row, n in enumerate(label_lengths):
        labels[row, n:] = -100
    return {"input_values": x, "attention_mask": mask, "labels": labels}


# 4 microbatches of 2 with 14, 5, 8 and 11 label tokens
BIG = dict(lengths=(1600, 1100, 1400, 1600, 900, 1250, 1600, 1000), label_lengths=(7, 7, 2, 3, 7, 1, 5, 6), seed=4)


def reference(enc: str, dec: str, double: bool = False) -> torch.nn.Module:
    """The perturbed transformers model in training mode with nothing random left: the factory's dropout and
    LayerDrop rates are 0, SpecAugment off."""
    hf = F.any_seq2seq(enc, dec)
    hf.encoder.register_forward_hook(contiguous_output)
    hf.encoder.config.apply_spec_augment = False
    return (hf.double() if double else hf).train()


def torch_loss_and_grads(hf: torch.nn.Module, batch: dict) -> tuple[float, dict[str, np.ndarray]]:
    """``loss.backward()``: the loss and every named parameter's gradient (zeros where none flows) as float64."""
    hf.zero_grad()
    dtype = next(hf.parameters()).dtype
    out = hf(input_values=torch.from_numpy(batch["input_values"]).to(dtype),
             attention_mask=torch.from_numpy(batch["attention_mask"]), labels=torch.from_numpy(batch["labels"]).long())
    out.loss.backward()
    grads = {n: np.zeros(p.shape) if p.grad is None else p.grad.double().numpy() for n, p in hf.named_parameters()}
    return out.loss.item(), grads


def hf_named(cfg, tree) -> dict[str, np.ndarray]:
    """A tree in the params' layout (params, gradients, masks) under transformers' names and layouts: the export."""
    return table.save(M.weight_rules(cfg), table.flatten(jax.tree.map(np.asarray, tree)))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model loaded from its checkpoint) per (encoder, decoder)."""
    return F.checkpoint_zoo(tmp_path_factory, reference)


@pytest.fixture(scope="module")
def programs(zoo):
    """Compiled programs of MODEL on the BIG batch, each compiled once for the whole module: ``step(optim, step)``
    an AOT-compiled train step (takes ``check_batch``'s arrays), ``grads(step)`` jitted ``loss_and_grad``."""
    _, ours = zoo(*MODEL)
    batch = check_batch(padded_batch(**BIG))
    steps, grads = {}, {}

    def step(optim: OptimConfig, cfg: StepConfig = EVAL_MODE, model_cfg=None):
        model_cfg = model_cfg or ours.config
        key = (optim, cfg, model_cfg)
        if key not in steps:
            state = init_state(model_cfg, ours.params, optim, seed=0)
            steps[key] = make_train_step(model_cfg, optim, cfg).jitted.lower(state, batch).compile()
        return steps[key]

    def grad(cfg: StepConfig = EVAL_MODE):
        if cfg not in grads:
            grads[cfg] = jax.jit(lambda p, b: loss_and_grad(ours.config, cfg, p, {}, b))(ours.params, batch)
        return grads[cfg]

    return step, grad


def assert_grads_match_torch(got: dict, want: dict, exact: dict) -> None:
    """Per HF tensor, our gradient within ``GRAD_RTOL`` of its largest entry of torch's fp32 one, or within
    ``FLOOR_FACTOR`` times torch's own fp32 error against float64 (``exact``); the floor is the exception."""
    floored = []
    for name, g in got.items():
        diff = np.abs(g - want[name]).max()
        if diff > GRAD_RTOL * np.abs(want[name]).max():
            floor = np.abs(want[name] - exact[name]).max()
            assert diff <= FLOOR_FACTOR * floor, (name, diff, np.abs(want[name]).max(), floor)
            floored.append(name)
    assert len(floored) < len(got) // 4, floored


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("enc,dec,options", [(*pair, None) for pair in PAIRS] + [
    pytest.param(*MODEL, XLA_DEFAULTS, id="-".join(MODEL) + "-xla-defaults")])
def test_loss_and_grads_match_pytorch(zoo, enc, dec, options):
    """A padded batch (attention_mask, -100 labels): loss and every gradient equal ``loss.backward()``. Per tensor
    the difference is at most 1e-5 of its largest gradient, or within a few times the fp32 noise floor that torch
    itself shows against a float64 run (the key biases, whose true gradient is 0: softmax ignores them). One case is
    compiled as users get it (``XLA_DEFAULTS``) rather than with the suite's fast-compile settings (conftest)."""
    hf, ours = zoo(enc, dec)
    batch = padded_batch()
    program = jax.jit(lambda p, b: loss_and_grad(ours.config, EVAL_MODE, p, {}, b), compiler_options=options)
    loss, tokens, grads = program(ours.params, batch)
    want_loss, want = torch_loss_and_grads(hf, batch)
    _, exact = torch_loss_and_grads(reference(enc, dec, double=True), batch)
    assert int(tokens) == 12
    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
    got = hf_named(ours.config, grads)
    assert sorted(got) == sorted(want)  # every trainable tensor of transformers, no other
    floored = []
    for name, g in got.items():
        diff = np.abs(g - want[name]).max()
        floor = np.abs(want[name] - exact[name]).max()
        if diff > GRAD_RTOL * np.abs(want[name]).max():
            assert diff <= FLOOR_FACTOR * floor, (name, diff, np.abs(want[name]).max(), floor)
            floored.append(name)
    assert len(floored) < len(got) // 4, floored  # the floor is the exception, not how the test passes


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_weight_decay_skips_what_the_trainer_skips(zoo, enc, dec):
    """AdamW decays exactly the tensors ``Trainer.get_decay_parameter_names`` returns (no biases, no norms)."""
    hf, ours = zoo(enc, dec)
    mask = decay_mask(ours.config)(ours.params)
    got = hf_named(ours.config, jax.tree.map(lambda d, p: np.full(p.shape, d), mask, ours.params))
    assert all(m.all() or not m.any() for m in got.values())  # a fused HF tensor is decided as one
    trainer = set(T.Trainer.get_decay_parameter_names(None, hf))
    assert {n for n, m in got.items() if m.all()} == {n for n, _ in hf.named_parameters() if n in trainer}
    assert any(m.all() for m in got.values()) and not all(m.all() for m in got.values())


# ---------------------------------------------------------------------------------------------------- optimizer


def assert_grads_close(got, want) -> None:
    """Two gradient trees of the same model equal up to float32 rounding: per tensor within 1e-5 of its largest
    value plus 1e-7 of the largest of all (what rounding leaves in tensors whose exact gradient is 0)."""
    want = table.flatten(jax.tree.map(np.asarray, want))
    top = max(np.abs(w).max() for w in want.values())
    for path, g in table.flatten(jax.tree.map(np.asarray, got)).items():
        diff = np.abs(g - want[path]).max()
        assert diff <= GRAD_RTOL * np.abs(want[path]).max() + 1e-7 * top, (path, diff, np.abs(want[path]).max())


def torch_steps(batch: dict, n: int, double: bool = False) -> tuple[dict[str, np.ndarray], list[dict]]:
    """``n`` steps of the Trainer's update on MODEL: its two parameter groups, ``torch.optim.AdamW``,
    ``clip_grad_norm_`` and the linear warm-up schedule. Returns the params (float64 numpy) and each step's loss,
    grad norm and rate."""
    hf = reference(*MODEL, double=double)
    decay = set(T.Trainer.get_decay_parameter_names(None, hf))
    groups = [{"params": [p for n, p in hf.named_parameters() if n in decay], "weight_decay": OPTIM.weight_decay},
              {"params": [p for n, p in hf.named_parameters() if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPTIM.learning_rate, betas=(OPTIM.adam_b1, OPTIM.adam_b2), eps=OPTIM.adam_eps)
    sched = T.get_linear_schedule_with_warmup(opt, OPTIM.warmup_steps, OPTIM.total_steps)
    log = []
    for _ in range(n):
        rate = sched.get_last_lr()[0]
        loss, _ = torch_loss_and_grads(hf, batch)
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), OPTIM.max_grad_norm)
        opt.step()
        sched.step()
        log.append({"loss": loss, "grad_norm": float(norm), "learning_rate": rate})
    return {n: p.detach().double().numpy() for n, p in hf.named_parameters()}, log


def test_adamw_steps_match_torch(zoo, programs):
    """Three steps (rates 0, half, full: warm-up then decay) with the Trainer's groups, weight decay and clipping:
    per tensor the params equal torch's within 2.5e-7 (two float32 ulps at 1), or within 8 times torch's own
    float32 noise where Adam's division by sqrt(v) has blown up the rounding noise of gradients that are nearly 0
    (key biases: 0 in exact arithmetic; weight-norm directions after projection). Torch's noise is measured two
    ways, as its float32 error against a float64 run and as the spread of two float32 runs that sum the batch in
    different orders (the same examples, rows permuted): which element of a tensor Adam amplifies most, and by
    how much, depends on the rounding, so one measure alone can miss the element another CPU's rounding hits."""
    _, ours = zoo(*MODEL)
    step, _ = programs
    batch = padded_batch(**BIG)
    state = init_state(ours.config, ours.params, OPTIM, seed=0)
    logs = []
    for _ in range(3):
        state, metrics = step(OPTIM)(state, check_batch(batch))
        logs.append({k: float(v) for k, v in metrics.items()})
    want, want_logs = torch_steps(batch, 3)
    exact, _ = torch_steps(batch, 3, double=True)
    perm = np.array([3, 0, 6, 1, 7, 2, 5, 4])  # the same batch, so the same exact result
    permuted, _ = torch_steps({k: v[perm] for k, v in batch.items()}, 3)
    for got, w in zip(logs, want_logs):
        assert got["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-6, abs=0)
        assert got["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
    assert [w["learning_rate"] for w in want_logs] == [0.0, OPTIM.learning_rate / 2, OPTIM.learning_rate]
    assert max(w["grad_norm"] for w in want_logs) > OPTIM.max_grad_norm  # clipping acted
    got, start = hf_named(ours.config, state.params), hf_named(ours.config, ours.params)
    assert sorted(got) == sorted(want)
    floored = []
    for name, value in want.items():
        diff = np.abs(got[name] - value).max()
        floor = max(np.abs(value - exact[name]).max(), np.abs(value - permuted[name]).max())
        if diff > 2.5e-7:
            assert diff <= 8 * floor, (name, diff, floor)
            floored.append(name)
    assert len(floored) < len(got) // 4, floored
    moved = {n: np.abs(want[n] - start[n]).max() for n in want}
    assert sum(m > 1e-3 for m in moved.values()) > 0.9 * len(moved)  # far beyond the tolerance
    # transformers gives the unused masked_spec_embed (no SpecAugment) no gradient, so AdamW does not decay it
    assert moved["encoder.masked_spec_embed"] == 0
    assert np.array_equal(got["encoder.masked_spec_embed"], start["encoder.masked_spec_embed"])
    assert int(state.step) == 3
    # the caller's params survive the donated state (init_state copies them)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(ours.params))


def test_schedules_match_transformers():
    """Every step's rate, including past total_steps, as transformers' LambdaLR schedules give it."""
    makers = {"linear": T.get_linear_schedule_with_warmup, "cosine": T.get_cosine_schedule_with_warmup,
              "constant": lambda opt, warm, _: T.get_constant_schedule_with_warmup(opt, warm)}
    for name, make in makers.items():
        for warm, total in ((0, 7), (3, 10), (4, 4)):
            optim = OptimConfig(learning_rate=2e-3, schedule=name, warmup_steps=warm, total_steps=total)
            opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.learning_rate)
            sched, want = make(opt, warm, total), []
            for _ in range(total + 4):
                want.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
            got = jax.jit(jax.vmap(learning_rate_schedule(optim)))(jnp.arange(total + 4))
            # float32 rates: the cosine's argument is rounded to float32 (relative 1e-7 of pi * progress)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6 * optim.learning_rate,
                                       err_msg=f"{name} {warm} {total}")
            assert got[total] == 0 or name == "constant" or warm == total  # the decay ends at 0 exactly


def test_clipping_matches_clip_grad_norm():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": {"c": rng.normal(size=(7,)).astype(np.float32)}}
    for max_norm in (0.5, 100.0):  # clipped, and left alone
        tensors = [torch.tensor(grads["a"]), torch.tensor(grads["b"]["c"])]
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
        for p, t in zip(params, tensors):
            p.grad = t.clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        tx = clip_grad_norm(max_norm)
        got, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
        np.testing.assert_allclose(np.asarray(got["a"]), params[0].grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got["b"]["c"]), params[1].grad.numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- accumulation


@pytest.mark.first  # four programs to compile (~1 min on 2 busy cores)
def test_accumulated_microbatches_equal_one_batch(zoo, programs):
    """4 microbatches with 14, 5, 8 and 11 label tokens: loss, gradients and params after a step equal one batch of
    8, which equals transformers' loss of the whole batch; the mean of
    the microbatches' own means (what naive accumulation gives) differs."""
    hf, ours = zoo(*MODEL)
    step, grads = programs
    batch = padded_batch(**BIG)
    loss1, tokens1, g1 = grads(EVAL_MODE)
    loss4, tokens4, g4 = grads(dataclasses.replace(EVAL_MODE, accum_steps=4))
    assert int(tokens1) == int(tokens4) == 38
    want_loss, want = torch_loss_and_grads(hf, batch)
    assert float(loss4) == pytest.approx(want_loss, rel=1e-5) and float(loss4) == pytest.approx(float(loss1), rel=1e-6)
    naive, naive_grads = [], []
    for i in range(4):
        micro = {k: v[2 * i: 2 * i + 2] for k, v in batch.items()}
        loss, grad = torch_loss_and_grads(hf, micro)
        naive.append(loss)
        naive_grads.append(grad)
    assert abs(np.mean(naive) - want_loss) > 1e-3 * want_loss
    assert_grads_close(g4, g1)
    one = hf_named(ours.config, g1)
    naive_differs = 0
    for name, g in one.items():
        mean_of_means = np.mean([ng[name] for ng in naive_grads], axis=0)
        naive_differs += np.abs(mean_of_means - want[name]).max() > 1e-3 * np.abs(g).max()
    assert naive_differs > len(one) // 2
    # params after one step (no warm-up): elementwise, AdamW's first update lr * g / (|g| + eps) moves by at most
    # lr / eps times the gradients' difference (the train step's own gradients differ from ``grads``' by rounding)
    after = {}
    for accum in (1, 4):
        state = init_state(ours.config, ours.params, ACCUM_OPTIM, seed=0)
        program = step(ACCUM_OPTIM, dataclasses.replace(EVAL_MODE, accum_steps=accum))
        state, metrics = program(state, check_batch(batch, accum))
        assert float(metrics["learning_rate"]) == pytest.approx(ACCUM_OPTIM.learning_rate, rel=1e-7)
        after[accum] = table.flatten(state.params)
    bound = ACCUM_OPTIM.learning_rate / ACCUM_OPTIM.adam_eps
    g1, g4 = table.flatten(g1), table.flatten(g4)
    for path, p1 in after[1].items():
        diff = np.abs(np.asarray(after[4][path]) - np.asarray(p1))
        assert (diff <= 2.5e-7 + bound * np.abs(np.asarray(g4[path]) - np.asarray(g1[path]))).all(), path
    with pytest.raises(InputError) as err:
        check_batch(padded_batch(), accum_steps=4)
    assert str(err.value) == "batch: 2 examples do not split into accum_steps=4 equal microbatches"


# ---------------------------------------------------------------------------------------------------- freezing


def test_frozen_feature_encoder_is_unchanged_and_not_differentiated(zoo, programs):
    """10 steps with the feature encoder frozen: its params are bit-identical, everything else moved, it has no
    optimizer state, and the compiled step does none of its gradient work: the unfrozen step costs at least half
    the flops of the feature encoder's backward pass alone more (its parameter gradients are needed for the
    clipping norm there, so XLA cannot drop them; here they are never formed)."""
    _, ours = zoo(*MODEL)
    step, _ = programs
    frozen_optim = dataclasses.replace(OPTIM, freeze=("feature_encoder",))
    program = step(frozen_optim)
    batch = check_batch(padded_batch(**BIG))
    state = init_state(ours.config, ours.params, frozen_optim, seed=0)
    slots = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert not any("feature_encoder" in s for s in slots) and any("feature_projection" in s for s in slots)
    for _ in range(10):
        state, metrics = program(state, batch)
    before, after = table.flatten(ours.params), table.flatten(state.params)
    for path, value in before.items():
        same = np.array_equal(np.asarray(after[path]), np.asarray(value))
        # masked_spec_embed: unused without SpecAugment, so not updated (as transformers: no gradient)
        assert same == path.startswith(("encoder/feature_encoder/", "encoder/masked_spec_embed")), path
    # the compiled programs: the saved work is the feature encoder's backward pass
    fe = ours.params["encoder"]["feature_encoder"]
    x = jnp.asarray(batch["input_values"])

    def features(p):
        return wav2vec2.feature_encoder(ours.config.encoder, p, x, jnp.float32)

    out = features(fe)
    forward = flops(jax.jit(features).lower(fe).compile())
    backward = flops(jax.jit(lambda p, ct: jax.vjp(features, p)[1](ct)).lower(fe, out).compile()) - forward
    saved = flops(step(OPTIM)) - flops(program)
    assert backward > 0 and saved >= 0.5 * backward, (saved, backward)


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_freeze_selects_the_named_parts(zoo, enc, dec):
    """Each freeze option, on transformers' names: feature encoder = ``encoder.feature_extractor``, encoder =
    ``encoder.``, decoder = ``decoder.``; all-but-adapter-and-cross-attention trains the adapter, every
    cross-attention tensor (norm included) and ``enc_to_dec_proj`` only."""
    _, ours = zoo(enc, dec)
    cross = re.compile(r"^encoder\.adapter\.|encoder_attn|crossattention|ln_cross_attn|^enc_to_dec_proj\.")
    expect = {"feature_encoder": lambda n: not n.startswith("encoder.feature_extractor."),
              "encoder": lambda n: not n.startswith("encoder."),
              "decoder": lambda n: not n.startswith("decoder."),
              "all_but_adapter_cross_attention": lambda n: bool(cross.search(n))}
    names = hf_named(ours.config, ours.params)
    for option, trains in expect.items():
        trainable, frozen = partition(ours.params, (option,))
        flags = {**{p: np.zeros(v.shape, bool) for p, v in table.flatten(frozen).items()},
                 **{p: np.ones(v.shape, bool) for p, v in table.flatten(trainable).items()}}
        got = table.save(M.weight_rules(ours.config), flags)
        assert sorted(got) == sorted(names)
        assert {n for n, m in got.items() if m.all()} == {n for n in names if trains(n)}, option
    everything = ("encoder", "decoder", "feature_encoder")
    if ours.config.has_enc_to_dec_proj:  # the projection belongs to neither part
        assert list(partition(ours.params, everything)[0]) == ["enc_to_dec_proj"]
    else:
        with pytest.raises(ConfigError) as err:
            partition(ours.params, everything)
        assert str(err.value) == "optim.freeze: ['encoder', 'decoder', 'feature_encoder'] leaves no parameter to train"


# ---------------------------------------------------------------------------------------------------- compute


def test_remat_policies_keep_loss_and_grads(programs):
    _, grads = programs
    loss, _, want = grads(EVAL_MODE)
    for policy in ("layer", "dots"):
        got_loss, _, got = grads(dataclasses.replace(EVAL_MODE, remat=policy))
        assert float(got_loss) == pytest.approx(float(loss), rel=1e-6)
        assert_grads_close(got, want)


def test_remat_recomputes_cross_attention_keys_and_values(zoo):
    """Rematerialised, the decoder's layers make their cross-attention K/V inside the scan (``CrossFrames``): the
    compiled gradient holds no stacked [L, B, N, S, H] keys or values (nor their gradients), which remat "none"
    keeps for the backward pass."""
    _, ours = zoo(*MODEL)
    batch = check_batch(padded_batch(**BIG))
    dec = ours.config.decoder
    frames = M.encode(ours.config, ours.params, jnp.asarray(batch["input_values"]),
                      jnp.asarray(batch["attention_mask"])).last_hidden_state.shape[1]
    stacked = f"f32[{dec.num_layers},{batch['labels'].shape[0]},{dec.num_heads},{frames},{dec.head_dim}]"

    def hlo(remat: str) -> str:
        cfg = dataclasses.replace(EVAL_MODE, remat=remat)
        fn = jax.jit(lambda p, b: loss_and_grad(ours.config, cfg, p, {}, b))
        return fn.lower(ours.params, batch).compile().as_text()

    assert stacked in hlo("none")
    assert stacked not in hlo("layer")


def test_bfloat16_compute_keeps_float32_state(zoo, programs):
    _, ours = zoo(*MODEL)
    step, _ = programs
    cfg = dataclasses.replace(EVAL_MODE, dtype="bfloat16")
    batch = check_batch(padded_batch(**BIG))
    state, full = step(OPTIM)(init_state(ours.config, ours.params, OPTIM, seed=0), batch)
    half_state, half = step(OPTIM, cfg)(init_state(ours.config, ours.params, OPTIM, seed=0), batch)
    for tree in (half_state.params, half_state.opt_state):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
            jnp.dtype(jnp.float32)}
    assert 0 < abs(float(half["loss"]) - float(full["loss"])) < 0.05
    assert float(half["grad_norm"]) == pytest.approx(float(full["grad_norm"]), rel=0.1)


def test_dropout_follows_the_state_key(zoo, programs):
    """With dropout, LayerDrop and SpecAugment on: the same key gives the same step bit for bit, another key or
    another step number other masks, and the loss differs from eval mode's."""
    _, ours = zoo(*MODEL)
    step, _ = programs
    enc = dataclasses.replace(ours.config.encoder, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                              feat_proj_dropout=0.1, layerdrop=0.1)
    dec = dataclasses.replace(ours.config.decoder, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                              layerdrop=0.1)
    cfg = dataclasses.replace(ours.config, encoder=enc, decoder=dec)
    program = step(OPTIM, StepConfig(), cfg)
    batch = check_batch(padded_batch(**BIG))
    runs = [program(init_state(cfg, ours.params, OPTIM, seed=s), batch) for s in (0, 0, 1)]
    (a, ma), (b, mb), (_, mc) = runs
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    later, ml = program(init_state(cfg, ours.params, OPTIM, seed=0)._replace(step=jnp.asarray(5, jnp.int32)), batch)
    _, eval_metrics = step(OPTIM)(init_state(ours.config, ours.params, OPTIM, seed=0), batch)
    losses = [float(m["loss"]) for m in (ma, mc, ml, eval_metrics)]
    assert len(set(losses)) == 4, losses


def test_eval_step_with_label_smoothing_matches_label_smoother(zoo):
    """make_eval_step: no dropout, the Trainer's LabelSmoother loss as a sum and a token count."""
    hf, ours = zoo(*MODEL)
    batch = padded_batch(**BIG)
    got = make_eval_step(ours.config, StepConfig(label_smoothing=0.1))(ours.params, {**batch, "ids": ["x"] * 8})
    logits = F.hf_forward(hf, input_values=batch["input_values"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"].astype(np.int64)).logits
    want = float(LabelSmoother(epsilon=0.1)({"logits": logits}, torch.from_numpy(batch["labels"]).long()))
    assert int(got["tokens"]) == 38
    assert float(got["loss_sum"]) / 38 == pytest.approx(want, rel=1e-5)
    plain = float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(batch["labels"]).long()))
    assert abs(plain - want) > 100 * 1e-5 * want  # the smoothing term is far above the tolerance


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_settings_and_batches_are_one_line_errors():
    cases = [
        (lambda: OptimConfig(schedule="step"),
         "optim.schedule: unknown schedule 'step'; choose one of ['linear', 'cosine', 'constant']"),
        (lambda: OptimConfig(freeze=("adapter",)), "optim.freeze: unknown part 'adapter'; choose from "
         "['feature_encoder', 'encoder', 'decoder', 'all_but_adapter_cross_attention']"),
        (lambda: OptimConfig(freeze="encoder"), "optim.freeze: expected a list of part names, got 'encoder'"),
        (lambda: OptimConfig(adam_b2=1.0), "optim.adam_b2 should be a finite number in [0, 1), got 1"),
        (lambda: OptimConfig(max_grad_norm=0), "optim.max_grad_norm should be a finite number > 0 or null, got 0"),
        (lambda: StepConfig(remat="all"), "step.remat: unknown policy 'all'; choose one of ['none', 'layer', 'dots']"),
        (lambda: StepConfig(dtype="float16"),
         "step.dtype: unknown compute dtype 'float16'; choose one of ['float32', 'bfloat16']"),
        (lambda: StepConfig(accum_steps=0), "step.accum_steps should be an integer >= 1, got 0"),
        (lambda: check_batch({"input_values": np.zeros((2, 100))}),
         "batch: 'labels' [batch, tokens] are required (-100 marks ignored positions)"),
        (lambda: check_batch({"labels": np.zeros((2, 3))}),
         "batch: expected exactly one of ['input_values', 'input_features'], got ['labels']"),
        (lambda: check_batch({"input_values": np.zeros((2, 100)), "labels": np.zeros((3, 3))}),
         "batch: arrays must share a leading batch axis, got sizes {'input_values': 2, 'labels': 3}"),
    ]
    for make, message in cases:
        with pytest.raises((ConfigError, InputError)) as err:
            make()
        assert str(err.value) == message
    assert OptimConfig(freeze=["encoder"]).freeze == ("encoder",)  # a list from a config file
