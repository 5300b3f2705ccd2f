"""`speechseq train` across processes (``jax.distributed``): 2 processes x 4 simulated CPU devices on 127.0.0.1 train
the tiny model of test_training_loop for 20 steps on a device mesh (data=2 x fsdp=2 x tensor=2), each process
reading its own rows of every batch (evaluation's too, decoding with the sharded params), and end with the data
order, the loss, the validation loss and WER and the final params (within 1e-6 relative; the gradient sums cross
processes through gloo, in another order than within one process, so not bit for bit) of 1 process x 8 devices on
the same mesh; a 2-process run killed with SIGKILL after a checkpoint and resumed
(its processes joined from the environment variables instead of the flags) ends bit for bit as the uninterrupted
one: params, optimizer state, metrics.jsonl, data order, kept checkpoints and final model.

Every run is the command itself in subprocesses (``python -m speechseq.cli train``), sharing one compilation cache.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_training_loop import (complete_checkpoints, corpus, final_state, leaves_equal, lines,  # noqa: F401
                                tiny_init, write_config)

MESH = "data=2,fsdp=2,tensor=2"
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sections(tiny_init: Path, corpus: Path, out: Path) -> dict:  # noqa: F811 (the fixtures' values)
    """20 steps of 8 utterances (3 batches an epoch), no dropout, a checkpoint every 5 steps, every step logged, an
    evaluation of the 3 validation utterances (one batch of 4: a padding row) at steps 10 and 20."""
    return {
        "model": {"init": str(tiny_init)},
        "data": {"train": str(corpus / "train.jsonl"), "valid": str(corpus / "valid.jsonl"), "batch_size": 8,
                 "num_workers": 1},
        "eval": {"batch_size": 4, "max_new_tokens": 6},
        # AdamW's eps 1e-3: with the default 1e-8 the first update of an entry whose gradient is ~0 is +-lr whatever
        # its rounding (see test_scale_out), so any difference in summation order would show as a full step
        "optim": {"learning_rate": 2e-3, "warmup_steps": 2, "weight_decay": 0.01, "adam_eps": 1e-3},
        "step": {"dropout": False},
        "train": {"steps": STEPS, "eval_every": 10, "save_every": 5, "keep_last": 2, "log_every": 1, "seed": 3,
                  "output_dir": str(out)},
        "log": {"data_order": True, "plot": False, "tensorboard": False, "progress": False},
    }


def launch(config: Path, cache: Path, processes: int, *extra: str, from_env: bool = False) -> list[subprocess.Popen]:
    """``speechseq train CONFIG --mesh MESH`` in ``processes`` processes of 8 / processes CPU devices each, joined
    by the flags (or, ``from_env``, by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    port = free_port()
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={8 // processes}".strip()
    runs = []
    for i in range(processes):
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        argv = [sys.executable, "-m", "speechseq.cli", "-q", "--cache-dir", str(cache), "train", str(config),
                "--mesh", MESH, *extra]
        if processes > 1 and from_env:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        elif processes > 1:
            argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        runs.append(subprocess.Popen(argv, cwd=config.parent, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    return runs


def finish(runs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Each process's stdout and stderr, once all have ended with status 0."""
    outs = []
    for p in runs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append((out, err))
    return outs


def model_tensors(folder: Path) -> dict[str, np.ndarray]:
    from speechseq.checkpoints.readers import open_checkpoint

    ckpt = open_checkpoint(folder)
    return {k: np.asarray(ckpt[k]) for k in ckpt}


@pytest.mark.slow
@pytest.mark.first  # the suite's longest test (~2 min): started last, it would run alone at the end
def test_two_processes_train_as_one_and_resume_after_kill_9(tiny_init, corpus, tmp_path):  # noqa: F811
    cache = tmp_path / "jax-cache"
    configs = {name: write_config(tmp_path / f"{name}.toml", sections(tiny_init, corpus, tmp_path / name))
               for name in ("one", "two", "cut")}
    t0 = time.perf_counter()
    one = launch(configs["one"], cache, 1)
    two = launch(configs["two"], cache, 2)
    order = tmp_path / "two" / "data_order.jsonl"
    while not lines(order) and all(p.poll() is None for p in two):  # compiled: "cut" starts with a warm cache
        time.sleep(0.05)
    cut = launch(configs["cut"], cache, 2)
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(6, 14)  # steps logged when killed; the first checkpoint is step 5's
    order = tmp_path / "cut" / "data_order.jsonl"
    deadline = time.monotonic() + 500
    while not (lines(order) >= kill_at and complete_checkpoints(tmp_path / "cut")):
        assert all(p.poll() is None for p in cut), f"the run ended before step {kill_at}: {cut[0].communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for step {kill_at}"
        time.sleep(0.02)
    for p in cut:
        p.send_signal(signal.SIGKILL)
    for p in cut:
        p.communicate()
    killed_after = lines(order)
    assert killed_after < STEPS, f"the run finished before the kill (seed {seed})"
    resumed = launch(configs["cut"], cache, 2, "--resume", from_env=True)
    results = {name: finish(runs) for name, runs in (("one", one), ("two", two), ("cut", resumed))}
    seconds = time.perf_counter() - t0

    # every process reports the same result; process 0 alone wrote the logs
    for name, outs in results.items():
        assert len({out.splitlines()[-1] for out, _ in outs}) == 1, (name, outs)
    last_one, last_two = (json.loads(results[n][0][0].splitlines()[-1]) for n in ("one", "two"))
    assert last_one["step"] == last_two["step"] == STEPS
    assert abs(last_one["loss"] - last_two["loss"]) <= 1e-5 * abs(last_one["loss"]), (last_one, last_two)
    # the evaluations decode with the sharded params, each process its rows: the same as 1 x 8 devices
    valid = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["split"] == "valid"] for n in ("one", "two")}
    assert [r["step"] for r in valid["two"]] == [10, 20] and all(r["utterances"] == 3 for r in valid["two"])
    for a, b in zip(valid["one"], valid["two"]):
        assert (a["wer"], a["cer"]) == (b["wer"], b["cer"]), (a, b)
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    assert not any("no checkpoint" in err for _, err in results["cut"])  # it continued from one
    a, b, c = (tmp_path / n for n in ("one", "two", "cut"))
    assert lines(b / "data_order.jsonl") == STEPS
    rows = [json.loads(x) for x in (b / "data_order.jsonl").read_text().splitlines()]
    assert all(len(r["ids"]) == 8 and None not in r["ids"] for r in rows)  # the global batch, both processes' rows
    assert (a / "data_order.jsonl").read_bytes() == (b / "data_order.jsonl").read_bytes()

    # 2 x 4 devices = 1 x 8 devices: the final model and the whole training state
    one_model, two_model = model_tensors(a / "model-hf"), model_tensors(b / "model-hf")
    assert one_model.keys() == two_model.keys()
    # per tensor, relative to its largest entry, or to 1e-3 of the model's largest for a tensor whose gradient is 0 in
    # exact arithmetic (attention key biases, which softmax ignores: they move by rounding noise alone)
    floor = 1e-3 * max(float(np.abs(v).max()) for v in one_model.values())
    worst = max(float(np.abs(one_model[k] - two_model[k]).max() / max(np.abs(one_model[k]).max(), floor))
                for k in one_model)
    identical = all(np.array_equal(one_model[k], two_model[k]) for k in one_model)
    (state_a, _), (state_b, meta_b) = final_state(a, tiny_init), final_state(b, tiny_init)
    assert int(state_b.step) == STEPS
    assert worst <= 1e-6, f"2 processes x 4 devices differ from 1 x 8 by {worst} relative"
    trained = max(float(np.abs(two_model[k] - v).max()) for k, v in model_tensors(tiny_init).items() if k in two_model)
    assert trained > 1e-3, "the params did not move, which proves nothing"

    # killed and resumed = uninterrupted, bit for bit
    why = f"killed after {killed_after} steps (seed {seed})"
    for name in ("metrics.jsonl", "data_order.jsonl"):
        assert (b / name).read_bytes() == (c / name).read_bytes(), (name, why)
    assert sorted(os.listdir(b / "checkpoints")) == sorted(os.listdir(c / "checkpoints")), why
    state_c, meta_c = final_state(c, tiny_init)
    assert leaves_equal(state_b, state_c), why
    assert meta_b["data"] == meta_c["data"]
    assert (b / "model-hf" / "model.safetensors").read_bytes() == (c / "model-hf" / "model.safetensors").read_bytes()
    print(f"2x4 vs 1x8: max relative difference {worst:.3g} (bit-identical: {identical}, "
          f"state leaves equal: {leaves_equal(state_a, state_b)}); {why}; {seconds:.0f} s")



def test_bad_mesh_and_distributed_settings_are_one_line(tmp_path):
    """Each mistake is one line naming the flag, setting or variable, before any model is read."""
    config = tmp_path / "run.toml"
    config.write_text('[model]\ninit = "nowhere"\n[data]\ntrain = "t.jsonl"\nbatch_size = 6\n')
    cases = [
        (["--mesh", "data=3"], {}, "speechseq: error: mesh.shape 'data=3': {'data': 3, 'fsdp': 1, 'tensor': 1} needs "
                                   "3 devices, 1 are available"),
        (["--mesh", "data=4"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
         "speechseq: error: mesh.shape 'data=4': data.batch_size / step.accum_steps = 6 rows per microbatch do not "
         "split over data x fsdp = 4 devices"),
        (["--mesh", "pipeline=2"], {}, "speechseq: error: mesh.shape 'pipeline=2': unknown axis 'pipeline'; axes are "
                                       "['data', 'fsdp', 'tensor']"),
        (["--num-processes", "2", "--process-id", "0"], {},
         "speechseq: error: --coordinator/--num-processes/--process-id: coordinator_address should be defined."),
        ([], {"JAX_PROCESS_ID": "one"}, "speechseq: error: JAX_PROCESS_ID: expected a non-negative integer, got 'one'"),
    ]
    for extra, env, message in cases:
        done = subprocess.run([sys.executable, "-m", "speechseq.cli", "-q", "train", str(config), *extra],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
        assert done.returncode == 2, (extra, done.stderr[-2000:])
        assert done.stderr.strip() == message, (extra, done.stderr[-2000:])
