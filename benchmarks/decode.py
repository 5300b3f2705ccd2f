"""Decoding speed of speechseq against transformers 5 (PyTorch) and transformers 4.46 (Flax, jitted), one run.

    python benchmarks/decode.py              # wav2vec2-base + bert-base, batch 4, 5 s audio, 32 new tokens
    python benchmarks/decode.py --quick      # tiny model, smoke test (< 1 min)
    python benchmarks/decode.py --skip-flax --repeats 5
    python benchmarks/decode.py --baseline HEAD~1     # also an A/B of this tree against a git ref, same run

All systems load the same random-weight checkpoint (built once with a fixed seed by transformers and saved to a
temporary folder), decode the same unpadded float32 audio without an attention mask (transformers 4.46's Flax
``generate`` fails with one) and generate exactly ``--new-tokens`` tokens: EOS is suppressed (``suppress_tokens=[eos]``)
so that every system does the same work (checked: every result has 1 + new tokens columns and no EOS). Times are
wall-clock seconds: "steady" is the median of ``--repeats`` calls after the first, "compile" is the first call minus
steady. The calls are interleaved: after each job's first call, every round runs each job once per system, back
to back, so all systems share the machine's fast and slow minutes; the ratio's range over rounds is printed too,
with the share of CPU time the hypervisor took (steal) while each system ran.

PyTorch and Flax each run in a process of their own (``competitor.py``), which times one call per request; Flax's
uses its own venv (``benchmarks/.venv-flax446``, built on first use), and if that venv cannot be built or run, the
script says so and goes on without it.

The roofline part measures this machine's float32 matmul FLOP/s and weight-streaming GB/s with XLA, and compares
speechseq's per-token decoder step (generate with all new tokens minus generate with one new token, divided by the
steps in between) with the lower bound "bytes the step must read / streaming GB/s". It also times the step's weight
dots alone (``weight_dots_job``), in the same rounds: how close the step's dot kernels themselves (the CPU kernel of
``speechseq.kernels`` where it builds, else XLA CPU's; the header says which) come to that bound on the step's
shapes (4 or 16 rows against 768-3072-wide weights), which separates the kernels' limit from the rest of the step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FLAX_VENV = HERE / ".venv-flax446"
FLAX_PACKAGES = ["transformers==4.46.3", "jax==0.4.30", "jaxlib==0.4.30", "flax==0.8.5", "numpy<2", "torch==2.13.0"]
START, PAD, EOS = 101, 0, 102  # BERT's [CLS], [PAD], [SEP]


# ----------------------------------------------------------------------------------------------------------------------
# The model and the inputs


def model_configs(quick: bool) -> tuple[dict, dict]:
    """Wav2Vec2Config and BertConfig keyword arguments: base size, or tiny for --quick."""
    enc = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)
    dec = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072)
    if quick:
        enc.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
        dec.update(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    return enc, dec


def build_checkpoint(directory: Path, quick: bool, batch: int, samples: int, encoder: dict | None = None,
                     decoder: dict | None = None):
    """Random-weight SpeechEncoderDecoderModel (seed 0) saved to ``directory``, plus the audio as audio.npy.
    ``encoder`` / ``decoder``: Wav2Vec2Config / BertConfig keyword arguments that replace ``model_configs``' ones."""
    import torch
    import transformers as T

    enc, dec = model_configs(quick)
    enc.update(encoder or {})
    dec.update(decoder or {})
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        T.Wav2Vec2Config(**enc),
        T.BertConfig(**dec, is_decoder=True, add_cross_attention=True, pad_token_id=PAD, eos_token_id=EOS))
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = START, PAD, EOS
    torch.manual_seed(0)
    model = T.SpeechEncoderDecoderModel(cfg).eval()
    model.save_pretrained(directory)
    rng = np.random.default_rng(0)
    np.save(directory / "audio.npy", rng.standard_normal((batch, samples)).astype(np.float32))
    return model


def timed(fn, repeats: int) -> dict:
    """First call (compiles) then ``repeats`` calls; ``fn`` must block until its result is ready."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    steady = statistics.median(runs)
    return {"compile_s": first - steady, "steady_s": steady, "runs_s": runs}


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks since boot from /proc/stat, or None where there is none (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return fields[7], sum(fields)


def interleaved(systems: dict[str, dict], repeats: int, first: dict[str, dict] | None = None) -> dict:
    """Times every system's jobs in rounds: each job's first call (compiles), then ``repeats`` rounds in which each
    job runs once per system, back to back. Interleaving gives every system the same share of the machine's
    slow and fast minutes (on a shared VM the same call varies by 2x within minutes), where timing one system
    after the other would compare different minutes.

    ``systems``: name -> {job: callable that blocks until done}. ``first``: name -> {job: seconds} of first calls
    the caller already made (then none is made here). Returns name -> {job: {"compile_s", "steady_s", "runs_s"},
    "steal": fraction of CPU time the hypervisor took during that system's timed calls, or None}.
    """
    jobs = list(dict.fromkeys(job for sys_jobs in systems.values() for job in sys_jobs))
    if first is None:
        first = {name: {} for name in systems}
        for name, sys_jobs in systems.items():
            for job, fn in sys_jobs.items():
                t = time.perf_counter()
                fn()
                first[name][job] = time.perf_counter() - t
    runs = {name: {job: [] for job in sys_jobs} for name, sys_jobs in systems.items()}
    ticks = {name: [0, 0] for name in systems}
    for _ in range(repeats):
        for job in jobs:
            for name, sys_jobs in systems.items():
                if job not in sys_jobs:
                    continue
                time.sleep(0.1)  # let the previous system's worker threads go idle
                before, t = cpu_ticks(), time.perf_counter()
                sys_jobs[job]()
                runs[name][job].append(time.perf_counter() - t)
                after = cpu_ticks()
                if before and after:
                    ticks[name][0] += after[0] - before[0]
                    ticks[name][1] += after[1] - before[1]
    out = {}
    for name in systems:
        out[name] = {}
        for job, times in runs[name].items():
            steady = statistics.median(times)
            out[name][job] = {"compile_s": first[name][job] - steady, "steady_s": steady, "runs_s": times}
        out[name]["steal"] = ticks[name][0] / ticks[name][1] if ticks[name][1] else None
    return out


def check(name: str, shape: tuple, eos_count: int, batch: int, new_tokens: int) -> None:
    """Every system must return [batch, 1 + new_tokens] with no EOS: the same amount of work."""
    if tuple(shape) != (batch, 1 + new_tokens) or eos_count:
        raise SystemExit(f"{name}: expected {batch} sequences of {1 + new_tokens} tokens without EOS, "
                         f"got shape {tuple(shape)} with {eos_count} EOS")


# ----------------------------------------------------------------------------------------------------------------------
# The three systems


def speechseq_generate(model, x, beams: int, new_tokens: int) -> np.ndarray:
    """``model.generate`` with the benchmark's settings (EOS suppressed), its result checked."""
    out = np.asarray(model.generate(x, max_new_tokens=new_tokens, num_beams=beams, do_sample=False, eos_token_id=EOS,
                                    suppress_tokens=[EOS], pad_token_id=PAD, decoder_start_token_id=START))
    check(f"speechseq num_beams={beams}", out.shape, int((out[:, 1:] == EOS).sum()), x.shape[0], new_tokens)
    return out


def speechseq_jobs(ckpt: Path, audio, args) -> tuple[dict, dict]:
    """speechseq's timed jobs: generate per num_beams, the same with one new token, the encoder, encoder + cross K/V.

    Also returns {"params", "frames"} for the roofline."""
    import jax

    from speechseq import SpeechSeq2Seq
    from speechseq import model as M

    model = SpeechSeq2Seq.from_pretrained(ckpt)
    cfg, params = model.config, model.params
    x = jax.device_put(audio)
    jobs = {}
    for beams in args.beams:
        def generate(beams=beams, new_tokens=args.new_tokens):
            speechseq_generate(model, x, beams, new_tokens)

        jobs[beams] = generate
        # the same program with one step: the difference is the token loop
        jobs[f"{beams}-one"] = lambda beams=beams: generate(beams, 1)
    # the parts before the token loop: the encoder, then the encoder plus cross-attention K/V of every layer
    jobs["encoder"] = lambda: jax.block_until_ready(M.encode_jit(cfg, params, x))
    prefill = jax.jit(lambda p, x: M.cross_kv(cfg, p, M.project(cfg, p, M.encode(cfg, p, x).last_hidden_state)))
    jobs["prefill"] = lambda: jax.block_until_ready(prefill(params, x))
    frames = jax.eval_shape(lambda p, x: M.encode(cfg, p, x).last_hidden_state, params, x).shape[1]
    dots = {}
    for beams in args.beams:
        jobs[f"{beams}-dots"] = weight_dots_job(model, args.batch * beams, dots)
    return jobs, {"params": params, "frames": frames, "dots": dots}


def weight_dots_job(model, rows: int, info: dict):
    """A job that runs only the decode step's weight dots, as the step does them (``dense`` on the decoder's
    decode-layout weights: ``kernel_p`` through the CPU kernel of ``speechseq.kernels`` where it runs, else
    ``kernel_t`` through XLA's dots; ``rows`` rows each, chained one after the other), in one jitted program: the
    rate the step's dot kernels reach on these shapes, timed in the same rounds as the step. Made on first call
    (after ``generate``'s first calls, whose compile figure includes the decode layout); records bytes and FLOPs
    in ``info``.
    """
    import jax
    import jax.numpy as jnp

    from speechseq.decoding.cpu import dense, prepare_decoder

    def width(w):  # Din of a weight in either layout
        return w.shape[1]

    made = {}

    def dots(weights, x):
        s = jnp.float32(0)
        for key, w in zip(made["keys"], weights):  # each dot waits for the previous one's result, as in the step
            s = dense({key: w}, x[:, :width(w)] + 1e-30 * s, w.dtype).sum()
        return s

    def run():
        if not made:
            tree = jax.tree_util.tree_leaves_with_path(prepare_decoder(model.config, model.params, model.dtype))
            found = [(path[-1].key, w) for path, w in tree
                     if getattr(path[-1], "key", None) in ("kernel_t", "kernel_p")]
            weights = [w for _, w in found]
            made.update(fn=jax.jit(dots), keys=[k for k, _ in found], weights=weights,
                        x=jnp.ones((rows, max(width(w) for w in weights)), weights[0].dtype))
            info[rows] = {"count": len(weights), "bytes": sum(w.nbytes for w in weights),
                          "flops": 2 * rows * sum(w.size for w in weights),
                          "kernel": "speechseq's CPU kernel" if found[0][0] == "kernel_p" else "XLA CPU's dot kernels"}
        jax.block_until_ready(made["fn"](made["weights"], made["x"]))

    return run


def flax_python(skip_build: bool) -> Path | None:
    """The Flax 4.46 venv's python, building the venv on first use; None (with a message) if that fails."""
    python = FLAX_VENV / "bin" / "python"
    if python.exists():
        return python
    if skip_build:
        print(f"[flax] {FLAX_VENV} does not exist and --no-build-flax was given: skipping Flax 4.46")
        return None
    print(f"[flax] building {FLAX_VENV} ({' '.join(FLAX_PACKAGES)}); this takes a few minutes", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(FLAX_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *FLAX_PACKAGES], check=True)
    except (subprocess.CalledProcessError, OSError) as err:
        print(f"[flax] could not build the Flax 4.46 venv ({err}); continuing without Flax 4.46")
        return None
    return python


class Worker:
    """A benchmark process answering one timed call per request line (``competitor.serve``'s protocol), so that its
    calls interleave with other systems' (``interleaved``). ``argv`` starts it; it must print the ready line first.

    Each system gets a process of its own so that no thread pool or allocator state passes between systems."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, timeout: float | None = None):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env)
        self.versions = self._read(timeout)["versions"]

    def _read(self, timeout: float | None = None) -> dict:
        if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.kill()
            raise TimeoutError(f"the {self.name} process gave no answer within {timeout:g} s; stopped it")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = "\n".join(self.stderr.read().strip().splitlines()[-15:])
            raise RuntimeError(f"the {self.name} process ended (exit {self.proc.returncode}). Last output:\n{tail}")
        return json.loads(line)

    def request(self, job: str, timeout: float | None = None) -> dict:
        """Runs ``job`` in the process and returns its reply ({"job", "s", ...}); ``timeout``: seconds to wait
        before stopping the process (TimeoutError)."""
        self.proc.stdin.write(f"{job}\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.stderr.close()


class Competitor(Worker):
    """``competitor.py`` for one decoding system in its own process."""

    def __init__(self, python: Path, system: str, ckpt: Path, args, env: dict | None = None):
        settings = {"new_tokens": args.new_tokens, "beams": args.beams, "start": START, "pad": PAD, "eos": EOS}
        self.batch, self.new_tokens = args.batch, args.new_tokens
        super().__init__(system, [str(python), str(HERE / "competitor.py"), system, str(ckpt), json.dumps(settings)],
                         env)

    def call(self, job: str) -> None:
        reply = self.request(job)
        if job != "encoder":
            check(f"{self.name} num_beams={job}", reply["shape"], reply["eos_count"], self.batch, self.new_tokens)

    def jobs(self, beams: list[int]) -> dict:
        jobs = {b: (lambda b=b: self.call(str(b))) for b in beams}
        jobs["encoder"] = lambda: self.call("encoder")
        return jobs


# ----------------------------------------------------------------------------------------------------------------------
# Roofline


def measure_machine(quick: bool) -> dict:
    """float32 matmul FLOP/s and weight-streaming GB/s (matrix-vector product and sum over a 256 MiB matrix).

    Best of several calls: this is what the machine can do, and the best call is the least disturbed by other work.
    The streaming rates also come as the median of those calls (``*_median``): on this shared machine the memory
    bandwidth varies between calls (25-53 GB/s best-of-15 in different runs), and the decoder step is a median too.
    """
    import jax
    import jax.numpy as jnp

    def best(fn, repeats):
        return min(timed(fn, repeats)["runs_s"])

    n = 1024 if quick else 4096
    k1, k2 = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(k1, (n, n)), jax.random.normal(k2, (n, n))
    matmul = jax.jit(jnp.dot)
    t_mm = best(lambda: matmul(a, b).block_until_ready(), 5)

    rows = 2048 if quick else 8192
    w = jax.random.normal(k1, (rows, 8192))  # 64 MiB (quick) or 256 MiB: far beyond any cache
    v = jax.random.normal(k2, (8192,))
    matvec = jax.jit(jnp.dot)
    mv = timed(lambda: matvec(w, v).block_until_ready(), 15)["runs_s"]
    total = jax.jit(jnp.sum)
    sm = timed(lambda: total(w).block_until_ready(), 15)["runs_s"]
    return {"matmul_gflops": 2 * n ** 3 / t_mm / 1e9, "matmul_n": n, "stream_bytes": w.nbytes,
            "matvec_gbs": w.nbytes / min(mv) / 1e9, "sum_gbs": w.nbytes / min(sm) / 1e9,
            "matvec_gbs_median": w.nbytes / statistics.median(mv) / 1e9,
            "sum_gbs_median": w.nbytes / statistics.median(sm) / 1e9}


def decoder_step_bytes(params, rows: int, utterances: int, frames: int, max_len: int, itemsize: int = 4) -> dict:
    """Bytes one decoder step must read: weights (incl. the tied output projection, excl. the position table and the
    cross-attention K/V projections, which run once per utterance), and the self / cross K/V caches."""
    import jax

    dec = params["decoder"]
    total = sum(x.nbytes for x in jax.tree.leaves(dec))
    once = [dec["embed"]["positions"], dec["layers"]["cross_attn"]["k"], dec["layers"]["cross_attn"]["v"]]
    once += [dec["embed"]["token_type"]] if "token_type" in dec["embed"] else []
    weights = total - sum(x.nbytes for x in jax.tree.leaves(once))
    L, _, D = dec["layers"]["self_attn"]["k"]["kernel"].shape
    return {"decoder_total": total, "weights": weights,
            "cross_kv": 2 * L * utterances * frames * D * itemsize,
            "self_kv": 2 * L * rows * max_len * D * itemsize,
            "flops": 2 * rows * (weights // itemsize)}


# ----------------------------------------------------------------------------------------------------------------------
# Report


names = {"sq": "speechseq", "pt": "transformers 5 PyTorch", "fx": "transformers 4.46 Flax (jit)",
         "new": "speechseq (this tree, own process)", "base": "speechseq (baseline ref, own process)"}


def baseline_worktree(ref: str, folder: Path) -> Path:
    """A detached git worktree of ``ref`` of this repository in ``folder`` (removed by ``remove_worktree``)."""
    root = HERE.parent
    subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(folder), ref], check=True)
    return folder


def remove_worktree(folder: Path) -> None:
    subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(folder)], check=False)


def ab_report(args, new: dict, base: dict) -> str:
    """This tree against the baseline ref, both in processes of their own, in the same interleaved rounds."""
    lines = [f"A/B: this tree against {args.baseline} (ratio = baseline / this tree: > 1 means this tree is faster)"]
    for job in ["encoder", *args.beams]:
        a, b = new[job], base[job]
        rounds = [y / x for x, y in zip(a["runs_s"], b["runs_s"])]
        label = "encoder" if job == "encoder" else strategy_name(job)
        lines.append(f"  {label:<10} this tree {a['steady_s']:.3f} s (compile {a['compile_s']:.2f}), baseline "
                     f"{b['steady_s']:.3f} s (compile {b['compile_s']:.2f}): {b['steady_s'] / a['steady_s']:.3f}x"
                     f" [rounds {min(rounds):.3f}-{max(rounds):.3f}x]")
    return "\n".join(lines)


def strategy_name(beams: int) -> str:
    return "greedy" if beams == 1 else f"beam-{beams}"


def report(args, machine, sq, pt, fx, dims, extra) -> str:
    lines = []
    header = f"{'system':<30}{'strategy':<10}{'compile s':>10}{'steady s':>10}   speechseq speedup"
    lines += [header, "-" * len(header)]
    targets = {("pt", 1): 2.5, ("fx", 1): 1.5, ("pt", 4): 3.5, ("fx", 4): 2.5}
    for beams in args.beams:
        strategy = strategy_name(beams)
        for key, res in (("sq", sq), ("pt", pt), ("fx", fx)):
            if res is None:
                lines.append(f"{names[key]:<30}{strategy:<10}{'n/a':>10}{'n/a':>10}")
                continue
            r = res[beams]
            ratio = ""
            if key != "sq":
                speedup = r["steady_s"] / sq[beams]["steady_s"]
                rounds = [a / b for a, b in zip(r["runs_s"], sq[beams]["runs_s"])]
                ratio = f"{speedup:.2f}x" + (f" [rounds {min(rounds):.2f}-{max(rounds):.2f}x]" if len(rounds) > 1 else "")
                if (key, beams) in targets:
                    goal = targets[(key, beams)]
                    ratio += f" (target >= {goal}x: {'met' if speedup >= goal else 'MISSED'})"
            lines.append(f"{names[key]:<30}{strategy:<10}{r['compile_s']:>10.2f}{r['steady_s']:>10.3f}   {ratio}")
    compile_ok = all(sq[b]["compile_s"] <= 5.0 for b in args.beams)
    lines.append(f"speechseq compile <= 5 s each: {'met' if compile_ok else 'MISSED'}")
    steal = {k: res["steal"] for k, res in (("sq", sq), ("pt", pt), ("fx", fx))
             if res is not None and res.get("steal") is not None}
    if steal:
        lines.append("CPU time taken by the hypervisor (steal) during the timed calls: "
                     + ", ".join(f"{names[k]} {100 * v:.1f}%" for k, v in steal.items())
                     + (" (over 5%: the machine was shared, timings are disturbed)" if max(steal.values()) > 0.05 else ""))

    lines += ["", "Where the time goes (steady state, seconds)"]
    enc = sq["encoder"]["steady_s"]
    pre = sq["prefill"]["steady_s"]
    lines.append(f"  speechseq encoder (encode_jit)            {enc:.3f}   (compile {sq['encoder']['compile_s']:.2f})")
    lines.append(f"  speechseq encoder + cross-attention K/V   {pre:.3f}")
    if pt:
        lines.append(f"  PyTorch encoder                           {pt['encoder']['steady_s']:.3f}")
    if fx:
        lines.append(f"  Flax 4.46 encoder (jit)                   {fx['encoder']['steady_s']:.3f}")
    for beams in args.beams:
        strategy = strategy_name(beams)
        one = sq[f"{beams}-one"]["steady_s"]
        lines.append(f"  speechseq {strategy:<8} with 1 new token {one:.3f}; token loop "
                     f"{sq[beams]['steady_s'] - one:.3f} for {args.new_tokens - 1} more steps "
                     f"= {1e3 * step_time(sq, beams, args):.1f} ms per step")

    lines += ["", "Roofline (this machine, XLA CPU, float32, best of several calls)"]
    lines.append(f"  matmul {machine['matmul_n']}^3: {machine['matmul_gflops']:.0f} GFLOP/s; streaming "
                 f"{machine['stream_bytes'] / 2**20:.0f} MiB: matrix-vector {machine['matvec_gbs']:.1f} GB/s, "
                 f"sum {machine['sum_gbs']:.1f} GB/s (medians {machine['matvec_gbs_median']:.1f} and "
                 f"{machine['sum_gbs_median']:.1f} GB/s)")
    bw = max(machine["matvec_gbs"], machine["sum_gbs"]) * 1e9
    bw_median = max(machine["matvec_gbs_median"], machine["sum_gbs_median"]) * 1e9
    for beams in args.beams:
        strategy = strategy_name(beams)
        d = dims[beams]
        per_token = step_time(sq, beams, args)
        bound_w = d["weights"] / bw
        bound_all = (d["weights"] + d["cross_kv"] + d["self_kv"]) / bw
        bound_flops = d["flops"] / (machine["matmul_gflops"] * 1e9)
        bound = max(bound_all, bound_flops)
        lines.append(f"  {strategy} ({d['rows']} rows): step reads {d['weights'] / 1e6:.0f} MB of weights "
                     f"(decoder total {d['decoder_total'] / 1e6:.0f} MB) + {d['cross_kv'] / 1e6:.0f} MB cross K/V + "
                     f"{d['self_kv'] / 1e6:.0f} MB self K/V; {d['flops'] / 1e9:.2f} GFLOP")
        lines.append(f"    bound: weights only {1e3 * bound_w:.1f} ms, weights + caches {1e3 * bound_all:.1f} ms, "
                     f"FLOPs {1e3 * bound_flops:.1f} ms; measured {1e3 * per_token:.1f} ms per step = "
                     f"{per_token / bound_w:.2f}x the weights-only bound, {per_token / bound:.2f}x the "
                     f"max(bytes, FLOPs) bound (target <= 1.5x)")
        bound_median = max((d["weights"] + d["cross_kv"] + d["self_kv"]) / bw_median, bound_flops)
        lines.append(f"    at the median streaming rate: bound {1e3 * bound_median:.1f} ms, measured = "
                     f"{per_token / bound_median:.2f}x")
        dots, info = sq.get(f"{beams}-dots"), extra["dots"].get(d["rows"])
        if dots and info:  # best round against the best-of streaming and matmul rates, as the bound above
            t = min(dots["runs_s"])
            own = max(info["bytes"] / bw, info["flops"] / (machine["matmul_gflops"] * 1e9))
            lines.append(f"    the step's {info['count']} weight dots alone (one program, same rounds): best "
                         f"{1e3 * t:.1f} ms = {info['bytes'] / t / 1e9:.1f} GB/s, {info['flops'] / t / 1e9:.0f} "
                         f"GFLOP/s, {t / own:.2f}x their bytes/FLOPs bound (about the floor {info['kernel']} set "
                         f"on these shapes); median "
                         f"{1e3 * dots['steady_s']:.1f} ms, the step = {per_token / dots['steady_s']:.2f}x that")
    return "\n".join(lines)


def step_time(sq: dict, beams: int, args) -> float:
    """Seconds per decoder step: (generate with all new tokens - generate with one) / the steps in between."""
    return (sq[beams]["steady_s"] - sq[f"{beams}-one"]["steady_s"]) / max(args.new_tokens - 1, 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and 1 s of audio: a smoke test")
    parser.add_argument("--skip-flax", action="store_true", help="leave out transformers 4.46 Flax")
    parser.add_argument("--no-build-flax", action="store_true", help="do not build the Flax venv when it is missing")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds after the first calls, median reported (default 3, or 1 with --quick)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None, help="audio length (default 5, or 1 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4], help="num_beams values to time")
    parser.add_argument("--json", type=Path, help="also write the raw timings here")
    parser.add_argument("--baseline", metavar="REF", help="also time speechseq at this git ref (a worktree) and this "
                        "tree, each in a process of its own, in the same rounds: an A/B of a change")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    samples = int(seconds * 16000)

    import jax
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(f"speechseq decode benchmark, {datetime.date.today()}, {cpu_name()} ({os.cpu_count()} CPUs), "
          f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
          + "".join(f", {name}={os.environ[name]!r}" for name in ("XLA_FLAGS", "GLIBC_TUNABLES")
                    if os.environ.get(name)))
    from speechseq import kernels

    print(f"speechseq's decode step: {kernels.status()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}" + (" (other work is running: timings will be noisy)"
                                                             if os.getloadavg()[0] > 0.5 else ""))
    print(f"model: {'tiny (--quick)' if args.quick else 'wav2vec2-base + bert-base'}, batch {args.batch}, "
          f"{seconds:g} s audio, {args.new_tokens} new tokens (EOS suppressed), float32, repeats {args.repeats}",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="speechseq-bench-") as tmp:
        ckpt = Path(tmp)
        t = time.perf_counter()
        build_checkpoint(ckpt, args.quick, args.batch, samples)
        audio = np.load(ckpt / "audio.npy")
        print(f"[setup] checkpoint built and saved in {time.perf_counter() - t:.1f} s", flush=True)

        print("[roofline] measuring matmul FLOP/s and streaming GB/s", flush=True)
        machine = measure_machine(args.quick)
        systems, procs = {}, {}
        systems["sq"], extra = speechseq_jobs(ckpt, audio, args)
        procs["pt"] = Competitor(Path(sys.executable), "pytorch", ckpt, args)
        if not args.skip_flax:
            python = flax_python(args.no_build_flax)
            if python is not None:
                try:
                    procs["fx"] = Competitor(python, "flax", ckpt, args)
                except (RuntimeError, OSError, json.JSONDecodeError) as err:
                    print(f"[flax] could not start transformers 4.46 Flax ({err}); continuing without it")
        if args.baseline:
            worktree = baseline_worktree(args.baseline, Path(tmp) / "baseline")
            procs["new"] = Competitor(Path(sys.executable), "speechseq", ckpt, args, {"PYTHONPATH": str(HERE.parent)})
            procs["base"] = Competitor(Path(sys.executable), "speechseq", ckpt, args, {"PYTHONPATH": str(worktree)})
        systems.update({key: proc.jobs(args.beams) for key, proc in procs.items()})
        print(f"[timing] {', '.join(names[k] for k in systems)}: first calls, then {args.repeats} interleaved rounds",
              flush=True)
        try:
            res = interleaved(systems, args.repeats)
        except RuntimeError as err:  # the Flax process died: time the other two
            if "fx" not in systems or procs["fx"].proc.poll() is None:
                raise
            print(f"[flax] {err}\n[flax] continuing without transformers 4.46 Flax")
            del systems["fx"]
            res = interleaved(systems, args.repeats)
        finally:
            for proc in procs.values():
                proc.close()
            if args.baseline:
                remove_worktree(Path(tmp) / "baseline")
        sq, pt, fx = res["sq"], res["pt"], res.get("fx")
        pt["versions"] = procs["pt"].versions
        if fx is not None:
            fx["versions"] = procs["fx"].versions

    params, frames = extra["params"], extra["frames"]
    dims = {b: {**decoder_step_bytes(params, args.batch * b, args.batch, frames, 1 + args.new_tokens),
                "rows": args.batch * b} for b in args.beams}
    text = report(args, machine, sq, pt, fx, dims, extra)
    if args.baseline:
        text += "\n\n" + ab_report(args, res["new"], res["base"])
    print()
    print(text)
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1-minute; {os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "speechseq": sq, "pytorch": pt, "flax446": fx,
                                         "dims": dims, "weight_dots": extra["dots"]}, indent=1, default=str))


if __name__ == "__main__":
    main()
