"""The training step on a device mesh (``speechseq.sharding``) equals one device, and FSDP really splits the state.

Eight simulated CPU devices (``--xla_force_host_platform_device_count=8``, set before jax starts, so the checks run
in one child process). On meshes data=8, fsdp=8 and data=2 x fsdp=2 x tensor=2, a training step with two
accumulated microbatches gives the loss, gradient norm and, per tensor, the gradient (``loss_and_grad`` jitted with
the same shardings) and the updated params and AdamW moments of one device within 1e-5 relative; the state stays in
the shardings the weight table gives it. FSDP memory: with fsdp=N (N = 2, 4, 8) the bytes of params plus optimizer
state on each device, read from the arrays' shards, are at most 1/N of the total plus the largest tensor, and only
tensors the weight table gives no logical axis are left whole; the compiled step's per-device arguments
(``memory_analysis()``) keep that bound plus the batch's share. ``generate`` (XLA decode plan) on the same three meshes, with the batch over ``data`` x
``fsdp`` and the params over ``fsdp`` / ``tensor``, gives one device's greedy and beam tokens. FSDP is per layer: in
the compiled fsdp=8 step's HLO the layer scans' loop bodies all-gather each layer's weights, no stacked weight is
gathered whole before them, and no activation is gathered over the batch's rows.

The model is a tiny one from ``hf_factory`` with widths divisible by 8 (a vocabulary of 64), so every weight has a
dimension FSDP can split; the one-device references are the plain ``make_train_step`` and ``generate_jit``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_factory as F
from speechseq.errors import ConfigError

CHILD = textwrap.dedent("""
    import re, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from speechseq import SpeechSeq2Seq, model as M, sharding as S
    from speechseq.checkpoints.table import flatten, logical_axes
    from speechseq.training import OptimConfig, StepConfig, init_state, make_train_step
    from speechseq.training.optim import partition
    from speechseq.training.step import loss_and_grad, check_batch
    from speechseq.decoding.generate import generate_jit
    from speechseq.decoding.plan import XlaPlan

    assert jax.device_count() == 8, jax.devices()
    model = SpeechSeq2Seq.from_pretrained(sys.argv[1])
    cfg = model.config
    rng = np.random.default_rng(0)
    B = 16
    lengths = rng.integers(900, 1601, B)
    x = np.zeros((B, 1600), np.float32)
    mask = np.zeros((B, 1600), np.int32)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.normal(0, 1, n)
        mask[i, :n] = 1
    labels = rng.integers(3, 64, size=(B, 7)).astype(np.int32)
    for i, n in enumerate(rng.integers(1, 8, B)):
        labels[i, n:] = -100
    batch = {"input_values": x, "attention_mask": mask, "labels": labels}
    # AdamW's first update is lr * g / (|g| + eps): with the default eps (1e-8) rounding noise in an entry whose
    # gradient is ~0 flips a whole +-lr step; eps 1e-3 keeps the update a smooth function of the gradient
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0, adam_eps=1e-3)
    step = StepConfig(accum_steps=2, dropout=False)
    trainable = partition(model.params, optim.freeze)[0]

    def rel(a, b, floor=1e-30):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))

    def worst(got, want):
        # per tensor, relative to its largest entry, or to 1e-3 of the tree's largest for a tensor that is 0 in exact
        # arithmetic (an attention key bias's gradient: softmax ignores it; its float value is rounding noise)
        got, want = flatten(got), flatten(want)
        assert got.keys() == want.keys()
        floor = 1e-3 * max(float(np.abs(np.asarray(v)).max()) for v in want.values())
        return max((rel(got[k], want[k], floor), k) for k in want)

    grad_fn = lambda p, b: loss_and_grad(cfg, step, p, {}, b)
    ref_loss, _, ref_grads = jax.jit(grad_fn)(trainable, batch)
    ref_state, ref_metrics = make_train_step(cfg, optim, step)(init_state(cfg, model.params, optim, 0), batch)
    ref_mu = ref_state.opt_state[1][0].mu

    def nbytes(a):
        return a.size * a.dtype.itemsize

    for spec in ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"):
        mesh = S.make_mesh(spec)
        shardings = S.state_shardings(cfg, optim, mesh)
        state = S.init_state_sharded(cfg, model.params, optim, 0, mesh)
        for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
            assert a.sharding.is_equivalent_to(s, a.ndim), (spec, a.sharding, s)
        if spec != "data=8":  # the params really are split: at least one weight over each non-batch axis
            specs = {str(s.spec) for s in jax.tree.leaves(shardings.params)}
            assert any("fsdp" in s for s in specs), (spec, specs)
            assert spec == "fsdp=8" or any("tensor" in s for s in specs), (spec, specs)
        new, metrics = S.make_sharded_train_step(cfg, optim, step, mesh=mesh)(state, batch)
        for a, s in zip(jax.tree.leaves(new), jax.tree.leaves(shardings)):
            assert a.sharding.is_equivalent_to(s, a.ndim), (spec, "after the step", a.sharding, s)
        sb, rep = S.batch_sharding(mesh), NamedSharding(mesh, P())
        sp = S.param_shardings(cfg, mesh, params=trainable)
        loss, _, grads = jax.jit(grad_fn, in_shardings=(sp, sb), out_shardings=(rep, rep, sp))(
            jax.device_put(trainable, sp), check_batch(batch, 2))
        checks = {
            "loss": rel(metrics["loss"], ref_metrics["loss"]),
            "grad loss": rel(loss, ref_loss),
            "grad_norm": rel(metrics["grad_norm"], ref_metrics["grad_norm"]),
            "grads": worst(grads, ref_grads),
            "params": worst(new.params, ref_state.params),
            "mu": worst(new.opt_state[1][0].mu, ref_mu),
        }
        for name, got in checks.items():
            d = got[0] if isinstance(got, tuple) else got
            assert d <= 1e-5, f"{spec}: {name} differs by {got} relative"
        assert float(metrics["loss"]) > 0 and float(ref_metrics["grad_norm"]) > 0
        print("mesh ok", spec, {k: v[0] if isinstance(v, tuple) else v for k, v in checks.items()})

    axes = logical_axes(M.weight_rules(cfg))
    unnamed = {p for p in flatten(model.params) if not any(axes[p])}
    whole_shapes = {()} | {tuple(flatten(model.params)[p].shape) for p in unnamed}
    for n in (2, 4, 8):
        mesh = S.make_mesh({"fsdp": n}, jax.devices()[:n])
        state = S.init_state_sharded(cfg, model.params, optim, 0, mesh)
        leaves = jax.tree.leaves((state.params, state.opt_state))
        total = sum(nbytes(a) for a in leaves)
        largest = max(nbytes(a) for a in leaves)
        per_device = {}
        for a in leaves:
            for shard in a.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + nbytes(shard.data)
        assert len(per_device) == n, per_device
        bound = total / n + largest
        assert max(per_device.values()) <= bound, (n, per_device, total, largest)
        # only params the table gives no logical axis stay whole (the positional conv's weight_g [K, 1, 1]), and of
        # the optimizer state only their moments and the step counts
        whole = {p for p, a in flatten(state.params).items() if a.sharding.is_fully_replicated}
        assert whole == unnamed, (n, whole)
        moments = [a.shape for a in jax.tree.leaves(state.opt_state) if a.sharding.is_fully_replicated]
        assert all(shape in whole_shapes for shape in moments), (n, moments)
        # the compiled step's own accounting (per device): its state arguments within the same bound (its
        # temporaries, printed, are mostly this tiny model's activations)
        train_step = S.make_sharded_train_step(cfg, optim, step, mesh=mesh)
        placed = jax.device_put(check_batch(batch, 2), S.batch_sharding(mesh))
        analysis = train_step.jitted.lower(state, placed).compile().memory_analysis()
        batch_bytes = sum(nbytes(a) for a in jax.tree.leaves(placed))
        params_bytes = sum(nbytes(a) for a in jax.tree.leaves(state.params))
        assert analysis.argument_size_in_bytes <= bound + batch_bytes, (n, analysis.argument_size_in_bytes, bound)
        print("fsdp ok", n, "per device", max(per_device.values()), "total", total, "bound", bound,
              "replicated", sum(nbytes(a) for a in leaves if a.sharding.is_fully_replicated),
              "compiled arguments", analysis.argument_size_in_bytes, "temp", analysis.temp_size_in_bytes,
              "params", params_bytes)

    # FSDP gathers each layer's weights inside the layer scans and keeps the activations split by rows: in the
    # compiled fsdp=8 step (no accumulation, so its 16 rows are the batch) no float array of rank >= 3 led by the
    # 16 rows is gathered, the layer scans' loop bodies gather weights, and no stacked layer weight [L, ...] is
    # gathered whole before them
    mesh = S.make_mesh("fsdp=8")
    state = S.init_state_sharded(cfg, model.params, optim, 0, mesh)
    one_step = StepConfig(dropout=False)
    hlo = S.make_sharded_train_step(cfg, optim, one_step, mesh=mesh).jitted.lower(
        state, jax.device_put(check_batch(batch, 1), S.batch_sharding(mesh))).compile().as_text()
    stacked = [tuple(a.shape) for p, a in flatten(model.params).items() if "/layers/" in p]
    gathers = {"entry": [], "loops": []}
    for comp in re.split(r"\\n(?=\\S.*\\{\\n)", hlo):
        where = "entry" if comp.startswith("ENTRY") else "loops"
        for dtype, dims in re.findall(r"= (\\w+)\\[([\\d,]*)\\]\\{[\\d,]*\\} all-gather(?:-start)?\\(", comp):
            gathers[where].append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    rows = [g for g in gathers["entry"] + gathers["loops"] if g[0].startswith("f") and len(g[1]) >= 3 and g[1][0] == B]
    assert not rows, f"activations gathered over the batch: {rows}"
    whole_stacks = [g for g in gathers["entry"]
                    if any(g[1][:1] == s[:1] and np.prod(g[1]) == np.prod(s) for s in stacked)]
    assert not whole_stacks, f"stacked layer weights gathered whole before the scan: {whole_stacks}"
    per_layer = {int(np.prod(s[1:])) for s in stacked if len(s) >= 3}
    in_loops = {int(np.prod(g[1])) for g in gathers["loops"]}
    assert per_layer & in_loops and len(gathers["loops"]) >= len(stacked), (per_layer, gathers["loops"])
    print("gathers ok fsdp=8:", len(gathers["loops"]), "in the layer scans,", len(gathers["entry"]), "outside")

    # generate with the batch over data (x fsdp) and the params over fsdp / tensor: one device's tokens
    model = SpeechSeq2Seq.from_pretrained(sys.argv[2])
    cfg = model.config
    plan = XlaPlan()
    cases = {"greedy": dict(max_new_tokens=8),
             "beam": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.7)}
    ones = {}
    for name, kw in cases.items():
        gen = model.generation_config(eos_token_id=2, pad_token_id=1, decoder_start_token_id=0, **kw)
        ones[name] = gen, generate_jit(cfg, model.params, jnp.asarray(x[:8]), jnp.asarray(mask[:8]), gen, None,
                                       model.dtype, plan.prepare(cfg, model.params, model.dtype, None), plan)
    for spec in ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"):
        mesh = S.make_mesh(spec)
        sp = S.param_shardings(cfg, mesh)
        if spec != "data=8":
            assert any(s.spec != P() for s in jax.tree.leaves(sp["decoder"])), (spec, sp["decoder"])
        sharded = jax.device_put(model.params, sp)
        xs, ms = (jax.device_put(a[:8], S.batch_sharding(mesh)) for a in (x, mask))
        for name, (gen, one) in ones.items():
            got = generate_jit(cfg, sharded, xs, ms, gen, None, model.dtype,
                               plan.prepare(cfg, sharded, model.dtype, None), plan)
            a, b = np.asarray(one.sequences), np.asarray(got.sequences)
            assert a.shape == b.shape and (a == b).all(), f"{spec} {name}: tokens differ\\n{a}\\n{b}"
            if mesh.shape["data"] > 1:  # generate keeps the rows on data (over fsdp alone XLA may gather them)
                assert not got.sequences.sharding.is_fully_replicated, got.sequences.sharding
            diff = float(np.abs(np.asarray(one.scores) - np.asarray(got.scores)).max())
            assert diff <= 1e-5, f"{spec} {name}: scores differ by {diff}"
            rows = len({tuple(r) for r in a})
            assert rows > 1, f"{name}: every row decodes the same tokens, which proves nothing"
            print("generate ok", name, spec, a.shape, "distinct rows", rows)
""")


def tiny_divisible_model(cross_scale: float = 1.0):
    """A perturbed wav2vec2 + BART model whose widths (32, MLP 64, convs 16, vocabulary 64) divide by 8; for decoding,
    cross-attention weights times ``cross_scale`` as ``hf_factory.decoding_seq2seq`` makes them, so rows differ
    (x10 also makes the loss ill-conditioned: fp32 rounding alone then moves the gradient norm by ~2e-5)."""
    enc = F.any_encoder_config("w2v-layer-stable", hidden_size=32, intermediate_size=64, conv_dim=(16, 16, 16),
                               num_attention_heads=4)
    dec = F.decoder_config("bart", hidden=32)
    dec.vocab_size, dec.decoder_ffn_dim, dec.decoder_attention_heads = 64, 64, 4
    model = F.seq2seq_from_configs(enc, dec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if F._is_cross_attention_weight(name):
                p.mul_(cross_scale)
    return model


@pytest.mark.slow
@pytest.mark.first
def test_sharded_training_step_equals_one_device_and_fsdp_splits_the_state(tmp_path):
    tiny_divisible_model().save_pretrained(tmp_path / "train")
    tiny_divisible_model(cross_scale=10.0).save_pretrained(tmp_path / "decode")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "train"), str(tmp_path / "decode")], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    print("\n".join(line for line in lines if " ok " in line))  # the figures, shown with pytest -s
    generated = [f"generate ok {mode} {spec}" for mode in ("greedy", "beam")
                 for spec in ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2")]
    for name in ("mesh ok data=8", "mesh ok fsdp=8", "mesh ok data=2,fsdp=2,tensor=2", "fsdp ok 2", "fsdp ok 4",
                 "fsdp ok 8", "gathers ok fsdp=8", *generated):
        assert any(line.startswith(name) for line in lines), proc.stdout


def test_mesh_specs_and_logical_rules():
    import jax
    from jax.sharding import PartitionSpec as P

    from speechseq import sharding as S

    mesh = S.make_mesh("data=-1")  # the parent process has one device
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert S.make_mesh({"tensor": 1}).shape == mesh.shape
    for bad, message in (("data=2", "needs 2 devices, 1 are available"), ("pipeline=1", "unknown axis 'pipeline'"),
                         ("data", "expected axis=size"), ("data=-1,fsdp=-1", "at most one of them -1"),
                         ("data=0", "positive integers")):
        with pytest.raises(ConfigError, match=message):
            S.make_mesh(bad)
    # the rules on a mesh shaped like data=2, fsdp=2, tensor=2 (a fake: logical_to_spec reads only axis sizes)
    fake = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 2, "tensor": 2}})()
    assert S.logical_to_spec(("layers", "embed", "heads"), (2, 32, 32), fake) == P(None, "fsdp", "tensor")
    assert S.logical_to_spec(("heads", "embed"), (32, 32), fake) == P("tensor", "fsdp")
    assert S.logical_to_spec(("vocab", "embed"), (61, 32), fake) == P(None, "fsdp")  # 61 does not divide by 2
    assert S.logical_to_spec(("layers", "heads"), (2, 32), fake) == P(None, "tensor")
    assert S.logical_to_spec((None, None, "conv_out"), (10, 1, 16), fake) == P(None, None, "fsdp")
    fsdp = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 4, "tensor": 1}})()
    assert S.logical_to_spec(("layers", "heads"), (2, 32), fsdp) == P(None, "fsdp")  # the fallback rule
    assert S.logical_to_spec(("layers", "mlp"), (2, 6), fsdp) == P(None, None)
    assert jax.device_count() == 1


LOAD_CHILD = textwrap.dedent("""
    import json, re, sys
    import jax, numpy as np
    from speechseq import SpeechSeq2Seq, sharding as S
    from speechseq.checkpoints.table import flatten
    from speechseq.checkpoints.convert import convert

    assert jax.device_count() == 8
    hf, converted = sys.argv[1], sys.argv[2]
    convert(hf, converted, progress=False)
    want = flatten(SpeechSeq2Seq.from_pretrained(hf).params)
    total = sum(a.size * 4 for a in want.values())
    largest = max(a.size * 4 for a in want.values())
    for spec in ("fsdp=8", "data=2,fsdp=2,tensor=2"):
        mesh = S.make_mesh(spec)
        expected = expected_model = flatten(S.param_shardings(SpeechSeq2Seq.from_pretrained(hf).config, mesh))
        for source in (hf, converted):
            got = flatten(S.load_sharded(source, mesh).params)
            assert got.keys() == want.keys()
            per_device = {}
            for p, a in got.items():
                assert a.sharding.is_equivalent_to(expected[p], a.ndim), (spec, p, a.sharding, expected[p])
                shard_shape = expected[p].shard_shape(a.shape)
                assert len(a.addressable_shards) == 8
                for shard in a.addressable_shards:
                    assert shard.data.shape == shard_shape, (spec, p, shard.data.shape, shard_shape)
                    per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
                assert np.array_equal(np.asarray(a), np.asarray(want[p])), (spec, p)
            split = sum(1 for p in got if not got[p].sharding.is_fully_replicated)
            assert split >= len(got) // 2, (spec, split, len(got))
            fsdp = mesh.shape["fsdp"] * mesh.shape["tensor"]
            bound = total / fsdp + largest
            assert max(per_device.values()) <= bound, (spec, per_device, total, bound)
            print("load ok", spec, "hf" if source == hf else "speechseq", "per device", max(per_device.values()),
                  "total", total, "split tensors", split, "of", len(got))
        # a warm start from the standalone encoder and decoder (plus a fresh adapter) into the same shardings
        warm = dict(encoder_add_adapter=True, decoder_start_token_id=0, pad_token_id=1)
        one = SpeechSeq2Seq.from_encoder_decoder_pretrained(sys.argv[3], sys.argv[4], **warm)
        want_warm = flatten(one.params)
        expected = flatten(S.param_shardings(one.config, mesh))
        got = flatten(SpeechSeq2Seq.from_encoder_decoder_pretrained(sys.argv[3], sys.argv[4], mesh=mesh, **warm).params)
        assert got.keys() == want_warm.keys() and any("adapter" in p for p in got)
        for p, a in got.items():
            assert a.sharding.is_equivalent_to(expected[p], a.ndim), (spec, p, a.sharding, expected[p])
            assert np.array_equal(np.asarray(a), np.asarray(want_warm[p])), (spec, p)
        print("load ok", spec, "warm start", len(got), "params")
        # a fresh model: each param made on the host and placed in its shards as it comes, the same values
        config = json.loads(open(f"{hf}/config.json").read())
        fresh = flatten(SpeechSeq2Seq.from_config(config, seed=1).params)
        got = flatten(SpeechSeq2Seq.from_config(config, seed=1, mesh=mesh).params)
        assert got.keys() == fresh.keys() == want.keys()
        for p, a in got.items():
            assert a.sharding.is_equivalent_to(expected_model[p], a.ndim), (spec, p, a.sharding)
            assert np.array_equal(np.asarray(a), np.asarray(fresh[p])), (spec, p)
        print("load ok", spec, "from_config", len(got), "params")
""")


def test_load_sharded_places_each_tensor_in_its_shards(tmp_path):
    """``sharding.load_sharded`` of a Hugging Face checkpoint and of its ``speechseq convert``: every param has the
    sharding the rules give it, every device holds only its shard (shape ``shard_shape``; per-device bytes at most
    the total over the param-splitting devices plus the largest tensor), and the values equal ``from_pretrained``'s.
    ``from_encoder_decoder_pretrained(..., mesh=mesh)`` (with a fresh adapter) and ``from_config(..., mesh=mesh)``
    likewise equal their unsharded results, each param in its sharding."""
    model = tiny_divisible_model()
    model.save_pretrained(tmp_path / "hf")
    model.encoder.save_pretrained(tmp_path / "encoder")
    model.decoder.save_pretrained(tmp_path / "decoder")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, *(str(tmp_path / name) for name in
                                                                ("hf", "converted", "encoder", "decoder"))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.split("\n") if line.startswith("load ok")]
    print("\n".join(lines))
    assert len(lines) == 8, proc.stdout
