"""The pure ``generate`` under ``jax.jit`` with the batch sharded over a device mesh gives what one device gives.

Four simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which must be set before jax is
imported, so the check runs in a child process): audio and mask sharded over the batch, params and decode-step
weights replicated, on a mesh of each axis type (``jax.make_mesh``'s default, Explicit, and ``Mesh(...)``'s, Auto);
greedy, beam search (with ``num_return_sequences``) and sampling with a key. Tokens must be equal, beam scores
within 1e-5, and the outputs must really be spread over the four devices. The teacher-forced loss and its gradient
(a data-parallel training step) must match one device within 1e-5, and ``SpeechSeq2Seq`` (its ``generate`` and
forward) must keep sharded inputs sharded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import hf_factory as F

CHILD = textwrap.dedent("""
    import itertools, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from speechseq import SpeechSeq2Seq, model as M
    from speechseq.decoding.cpu import CpuPlan
    from speechseq.decoding.generate import generate_jit
    from speechseq.decoding.plan import XlaPlan

    assert jax.device_count() == 4, jax.devices()
    model = SpeechSeq2Seq.from_pretrained(sys.argv[1])
    rng = np.random.default_rng(0)
    lengths = [1600, 1100, 1400, 900, 1600, 1250, 1000, 1500]
    x = np.zeros((8, 1600), np.float32)
    mask = np.zeros((8, 1600), np.int32)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.normal(0, 1, n)
        mask[i, :n] = 1
    meshes = {  # jax.make_mesh's default axis type is Explicit (sharding in types); Mesh(...) gives Auto (GSPMD)
        "explicit": jax.make_mesh((4,), ("data",)),
        "auto": jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
    }
    assert meshes["explicit"].axis_types == (jax.sharding.AxisType.Explicit,), meshes["explicit"].axis_types
    params = model.params
    plans = {plan: plan.prepare(model.config, model.params, model.dtype, None) for plan in (CpuPlan(), XlaPlan())}
    cases = {
        "greedy": dict(max_new_tokens=8),
        "beam": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.7,
                     early_stopping=False),
        "sample": dict(max_new_tokens=8, do_sample=True, top_k=10, temperature=1.3),
    }
    key = jax.random.key(3)
    tokens = dict(eos_token_id=2, pad_token_id=1, decoder_start_token_id=0)
    one_device = {}
    for (name, kw), (plan, dec) in itertools.product(cases.items(), plans.items()):
        gen = model.generation_config(**tokens, **kw)
        k = key if gen.do_sample else None
        one = generate_jit(model.config, params, jnp.asarray(x), jnp.asarray(mask), gen, k, model.dtype, dec, plan)
        a = np.asarray(one.sequences)
        one_device[name, plan.name] = a[:, :int(one.length)]
        for kind, mesh in meshes.items():
            if kind == "auto" and name != "greedy":  # the Auto mesh once: its search code is the Explicit one's
                continue
            batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
            sharded = generate_jit(model.config, jax.device_put(params, replicated), jax.device_put(x, batch),
                                   jax.device_put(mask, batch), gen, k, model.dtype, jax.device_put(dec, replicated),
                                   plan)
            where = f"{name}, {plan.name} plan, {kind} mesh"
            devices = len(sharded.sequences.sharding.device_set)
            assert devices == 4, f"{where}: sequences on {devices} device(s)"
            assert not sharded.sequences.sharding.is_fully_replicated, f"{where}: sequences replicated, not sharded"
            b = np.asarray(sharded.sequences)
            assert a.shape == b.shape and (a == b).all(), f"{where}: tokens differ\\n{a}\\n{b}"
            assert int(one.length) == int(sharded.length), where
            diff = float(np.abs(np.asarray(one.scores) - np.asarray(sharded.scores)).max())
            assert diff <= 1e-5, f"{where}: scores differ by {diff}"
        print(name, "ok", plan.name, a.shape, "distinct rows", len({tuple(r) for r in a}))

    # the teacher-forced loss and its gradient (a data-parallel training step's work)
    labels = rng.integers(3, 60, size=(8, 6)).astype(np.int32)
    labels[2, 4:] = -100
    loss_grad = jax.jit(jax.value_and_grad(lambda p, x, m, l: M.forward(model.config, p, x, m, labels=l).loss))
    ref = loss_grad(params, x, mask, labels)
    for kind, mesh in meshes.items():
        batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        got = loss_grad(jax.device_put(params, replicated), *(jax.device_put(a, batch) for a in (x, mask, labels)))
        diff = max(float(np.abs(np.asarray(g) - np.asarray(r)).max())
                   for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
        assert diff <= 1e-5, f"loss and grads, {kind} mesh: differ by {diff}"
    print("loss-grad ok")

    # the object API keeps sharded inputs sharded (given replicated params); its generate asks for the beam case
    # above, so it runs the program compiled there if it passes the same shardings
    ids = np.zeros((8, 3), np.int32)
    want_logits = np.asarray(model(x, attention_mask=mask, decoder_input_ids=ids).logits)
    for kind, mesh in list(meshes.items())[:1]:  # Explicit (the Auto mesh's shardings are checked above)
        batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        m = SpeechSeq2Seq.from_pretrained(sys.argv[1])
        m.params = jax.device_put(m.params, replicated)
        xs, ms = jax.device_put(x, batch), jax.device_put(mask, batch)
        seqs = m.generate(xs, attention_mask=ms, **tokens, **cases["beam"])
        assert np.array_equal(seqs, one_device["beam", "cpu"]), f"object generate, {kind} mesh: tokens differ"
        logits = m(xs, attention_mask=ms, decoder_input_ids=jax.device_put(ids, batch)).logits
        assert not logits.sharding.is_fully_replicated, f"object forward, {kind} mesh: logits not sharded"
        diff = float(np.abs(np.asarray(logits) - want_logits).max())
        assert diff <= 1e-5, f"object forward, {kind} mesh: logits differ by {diff}"
    print("object ok")
""")


@pytest.mark.slow
@pytest.mark.first
def test_sharded_over_batch_equals_one_device(tmp_path):
    path = tmp_path / "model"
    F.decoding_seq2seq("w2v-layer-stable", "bart").save_pretrained(path)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    for name in ("greedy", "beam", "sample", "loss-grad", "object"):
        assert any(line.startswith(f"{name} ok") for line in lines), proc.stdout
    # the rows differ from each other: a model that decodes one token sequence for everything proves nothing
    assert all(int(line.rsplit(" ", 1)[1]) > 1 for line in lines if " ok " in line), proc.stdout
