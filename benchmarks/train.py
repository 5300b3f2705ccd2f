"""Training-step speed and memory of speechseq against transformers 5 (PyTorch) and transformers 4.46 (Flax), one run.

    python benchmarks/train.py                  # wav2vec2-base stable-LN + bert-base, batch 4 x 5 s, 32 labels
    python benchmarks/train.py --quick          # tiny model, 1 s of audio: a smoke test (~1 min)
    python benchmarks/train.py --small          # examples/synth/make_model.py's model, batch 16 x 4 s
    python benchmarks/train.py --systems sq sq-layer pt pt-ckpt --repeats 5
    python benchmarks/train.py --profile        # speechseq's step per XLA op, in this process (no comparison)
    python benchmarks/train.py --gpu --systems sq pt --dtype bfloat16 --batch 32   # on a CUDA GPU (no Flax)

Every system trains the same random-weight checkpoint (built once with a fixed seed by transformers, saved to a
temporary folder; ``--small``: made by ``examples/synth/make_model.py``) on the same batch (float32 audio without
padding, random labels without -100), one AdamW step per call in float32 with global-norm clipping at 1.0, weight
decay 0.01 and the Trainer's exclusions (biases and norms), dropout on as the config says. Systems (``--systems``):

  sq, sq-layer, sq-dots  speechseq ``training.make_train_step`` (jitted, state donated), remat "none" / "layer" /
                         "dots" (``layers.core.remat``), each in a process of its own
  pt, pt-ckpt            transformers 5 ``SpeechEncoderDecoderModel`` in train mode, ``loss.backward()``,
                         ``clip_grad_norm_``, ``torch.optim.AdamW``; pt-ckpt with ``gradient_checkpointing_enable()``
  fx                     transformers 4.46 ``FlaxSpeechEncoderDecoderModel`` (``from_pt=True``): ``jax.jit`` of
                         ``value_and_grad`` of its ``train=True`` forward + optax ``clip_by_global_norm`` and
                         ``adamw``, params and optimizer state donated; in ``benchmarks/.venv-flax446`` (built by
                         ``decode.flax_python``). Its first step compiles for ~1000 s at base size on 2 cores:
                         ``--flax-timeout`` stops it, ``--skip-flax`` leaves it out.

Regularisation: hidden, attention and activation dropout 0.1 (wav2vec2's defaults), BERT's hidden and attention
dropout 0.1, ``feat_proj_dropout`` 0, SpecAugment's ``mask_time_prob`` 0.05 (PyTorch and speechseq; transformers
4.46's Flax seq2seq model has no SpecAugment of its own: a few masked frames, no measurable cost), LayerDrop 0
(transformers' default 0.1 would skip a random number of layers per step in PyTorch and speechseq, and Flax 4.46 has
no LayerDrop, so the systems would do different work).

Each system runs in a process of its own (``Worker``, ``competitor.serve``'s protocol: one timed step per request).
The first step of each (compile for the jitted ones) is timed on its own, then ``--repeats`` interleaved rounds run
one step per system back to back (``decode.interleaved``): on a shared machine the systems share the same minutes.
*step*: median over the rounds; *first*: the first step's time; *CPU*: the process's user + system CPU seconds
per step (less sensitive to other work than wall time, which it exceeds when both cores run); *faults*: minor page
faults per step (fresh memory touched: each costs kernel time); *peak RSS*: the
process's resident-set high-water mark over its whole life (load, compile, steps: ``/proc/self/status``); *step
growth*: the most the resident set grew during one steady step (the high-water mark is reset before each step);
speechseq's *XLA temp*: the compiled step's temporary buffers (activations, gradients, work space) from
``memory_analysis()``, and *activations* = XLA temp minus the gradients' size.

``--gpu`` runs speechseq (JAX's CUDA backend, no memory preallocated) and PyTorch on the GPU and adds *GPU peak*:
the most device memory each held (JAX ``memory_stats()["peak_bytes_in_use"]``, ``torch.cuda.max_memory_allocated``);
float32 matmuls are TF32 in both, as JAX does by default (``torch.set_float32_matmul_precision("high")``).
``--dtype bfloat16``: speechseq's ``StepConfig(dtype="bfloat16")`` (float32 params and optimizer state) against
PyTorch's ``torch.autocast(dtype=torch.bfloat16)`` around the forward and loss.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from competitor import serve
from decode import HERE, PAD, START, Worker, build_checkpoint, cpu_name, flax_python, interleaved

SYSTEMS = {"sq": "speechseq, remat none", "sq-layer": "speechseq, remat layer", "sq-dots": "speechseq, remat dots",
           "pt": "transformers 5 PyTorch", "pt-ckpt": "PyTorch, gradient checkpointing",
           "fx": "transformers 4.46 Flax (jit)"}
DEFAULT_SYSTEMS = ("sq", "sq-layer", "pt", "fx")
LABEL_LOW = 1000  # label ids drawn from [LABEL_LOW, vocab) (base size), clear of BERT's specials
OPTIM = dict(learning_rate=1e-4, weight_decay=0.01, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, max_grad_norm=1.0)
TRAIN_ENCODER = dict(layerdrop=0.0)  # the rest of the regularisation as transformers' defaults (module docstring)
# issue 27's targets for base size, batch 4
TARGETS = {"pt_speedup": 1.5, "fx_speedup": 3.0, "compile_s": 60.0, "remat_activations": 2.0}


# ----------------------------------------------------------------------------------------------------------------------
# The model and the batch


def build(directory: Path, case: str, batch: int, samples: int, labels: int) -> dict:
    """The checkpoint of ``case`` ("base", "quick" or "small") in ``directory`` with audio.npy [B, N] and labels.npy
    [B, T]; returns {"vocab", "start", "pad"}."""
    if case == "small":
        sys.path.insert(0, str(HERE.parent / "examples" / "synth"))
        from make_model import make_model
        from make_tokenizer import save_tokenizer

        make_model(save_tokenizer(directory.parent / "tokenizer"), directory, seed=0, encoder="wav2vec2")
        np.save(directory / "audio.npy", np.random.default_rng(0).standard_normal((batch, samples)).astype(np.float32))
        config = json.loads((directory / "config.json").read_text())
        vocab, low = config["decoder"]["vocab_size"], 4  # after [PAD] [UNK] [CLS] [SEP]
        start, pad = config["decoder_start_token_id"], config["pad_token_id"]
    else:
        model = build_checkpoint(directory, case == "quick", batch, samples, encoder=TRAIN_ENCODER)
        vocab, low, start, pad = model.config.decoder.vocab_size, LABEL_LOW if case == "base" else 4, START, PAD
        del model
    np.save(directory / "labels.npy", np.random.default_rng(1).integers(low, vocab, (batch, labels)).astype(np.int32))
    return {"vocab": vocab, "start": start, "pad": pad}


# ----------------------------------------------------------------------------------------------------------------------
# Inside a worker process: one system's step


class Memory:
    """This process's resident set from /proc/self/status: the peak over its life and the growth during each step.

    The high-water mark (VmHWM) is read before it is reset (``clear_refs``), so ``peak`` misses nothing."""

    def __init__(self) -> None:
        self.peak, self.start, self.resettable = 0, 0, True

    @staticmethod
    def status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}

    def before(self) -> None:
        s = self.status()
        self.peak = max(self.peak, s["VmHWM"])
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
        except OSError:
            self.resettable = False
        self.start = self.status()["VmRSS"]

    def after(self) -> int | None:
        """Bytes the resident set grew by since ``before`` at its highest (None where the mark cannot be reset)."""
        hwm = self.status()["VmHWM"]
        self.peak = max(self.peak, hwm)
        return hwm - self.start if self.resettable else None


def cpu_and_faults() -> tuple[float, int]:
    """This process's user + system CPU seconds and minor page faults so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def worker(settings: dict) -> None:
    """A worker process: loads its system (``settings["system"]``), then serves "step" and "stats" requests."""
    ckpt = Path(settings["ckpt"])
    audio, labels = np.load(ckpt / "audio.npy"), np.load(ckpt / "labels.npy")
    memory = Memory()
    memory.before()
    make = {"sq": speechseq_step, "pt": pytorch_step, "fx": flax_step}[settings["system"].split("-")[0]]
    step, stats, versions = make(settings, ckpt, audio, labels)

    def timed_step() -> dict:
        memory.before()
        cpu, faults = cpu_and_faults()
        loss = step()
        cpu_after, faults_after = cpu_and_faults()
        return {"loss": loss, "cpu_s": cpu_after - cpu, "faults": faults_after - faults, "growth": memory.after()}

    def all_stats() -> dict:
        memory.after()
        return {**stats, "peak_rss": memory.peak}

    serve({"step": timed_step, "stats": all_stats}, versions, lambda out: out)


def speechseq_step(settings: dict, ckpt: Path, audio: np.ndarray, labels: np.ndarray):
    import jax

    import speechseq
    from speechseq import SpeechSeq2Seq
    from speechseq.training import OptimConfig, StepConfig, init_state, make_train_step
    from speechseq.training.step import check_batch

    model = SpeechSeq2Seq.from_pretrained(ckpt)
    optim = OptimConfig(schedule="constant", **OPTIM)
    remat = settings["system"].partition("-")[2] or "none"
    if settings["gpu"] and jax.default_backend() != "gpu":
        raise RuntimeError(f"--gpu: JAX runs on {jax.default_backend()}, not a GPU")
    train_step = make_train_step(model.config, optim, StepConfig(remat=remat, dtype=settings["dtype"]))
    state = [init_state(model.config, model.params, optim, seed=0)]
    del model  # the state holds the only copy of the params
    batch = jax.device_put(check_batch({"input_values": audio, "labels": labels}))
    compiled, stats = [], {}

    def step() -> float:
        if not compiled:  # the first step traces and compiles (AOT, to read the program's memory)
            compiled.append(train_step.jitted.lower(state[0], batch).compile())
            analysis = compiled[0].memory_analysis()
            grads = sum(x.nbytes for x in jax.tree.leaves(state[0].params))
            stats.update(temp=analysis.temp_size_in_bytes, grads=grads,
                         state=sum(x.nbytes for x in jax.tree.leaves(state[0])))
        state[0], metrics = compiled[0](state[0], batch)
        loss = float(metrics["loss"])
        if settings["gpu"]:
            stats["device_peak"] = jax.local_devices()[0].memory_stats()["peak_bytes_in_use"]
        return loss

    return step, stats, {"speechseq": os.path.dirname(speechseq.__file__), "jax": jax.__version__, "remat": remat}


def decay_groups(named) -> tuple[list, list]:
    """(decayed, not decayed) parameters as the Trainer splits them: no decay for biases and norm parameters."""
    decay, no_decay = [], []
    for name, param in named:
        (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(param)
    return decay, no_decay


def pytorch_step(settings: dict, ckpt: Path, audio: np.ndarray, labels: np.ndarray):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if settings["gpu"] else "cpu"
    if settings["gpu"]:
        if not torch.cuda.is_available():
            raise RuntimeError("--gpu: torch sees no CUDA device")
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's default precision on the GPU
    model = transformers.SpeechEncoderDecoderModel.from_pretrained(ckpt).train().to(device)
    if settings["system"] == "pt-ckpt":
        model.gradient_checkpointing_enable()
    decay, no_decay = decay_groups(model.named_parameters())
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=OPTIM["learning_rate"],
                            betas=(OPTIM["adam_b1"], OPTIM["adam_b2"]), eps=OPTIM["adam_eps"])
    x, y = torch.from_numpy(audio).to(device), torch.from_numpy(labels).long().to(device)
    stats = {}

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=settings["dtype"] == "bfloat16"):
            loss = model(input_values=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["max_grad_norm"])
        opt.step()
        loss = loss.item()
        if settings["gpu"]:
            stats["device_peak"] = torch.cuda.max_memory_allocated()
        return loss

    return step, stats, {"transformers": transformers.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}


def flax_step(settings: dict, ckpt: Path, audio: np.ndarray, labels: np.ndarray):
    import flax
    import jax
    import jax.numpy as jnp
    import optax
    import transformers
    from flax.traverse_util import flatten_dict, unflatten_dict
    from transformers import FlaxSpeechEncoderDecoderModel

    transformers.utils.logging.disable_progress_bar()
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(ckpt, from_pt=True)
    flat = flatten_dict(model.params)
    mask = unflatten_dict({k: not (k[-1] == "bias" or any("norm" in part.lower() for part in k)) for k in flat})
    tx = optax.chain(optax.clip_by_global_norm(OPTIM["max_grad_norm"]),
                     optax.adamw(OPTIM["learning_rate"], OPTIM["adam_b1"], OPTIM["adam_b2"], OPTIM["adam_eps"],
                                 weight_decay=OPTIM["weight_decay"], mask=mask))
    x, y = jnp.asarray(audio), jnp.asarray(labels)
    # teacher forcing as transformers' shift_tokens_right
    decoder_input_ids = jnp.concatenate([jnp.full_like(y[:, :1], settings["start"]), y[:, :-1]], axis=1)

    def loss_fn(params, rng):
        logits = model(x, decoder_input_ids=decoder_input_ids, params=params, dropout_rng=rng, train=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(params, opt_state, rng):
        rng, dropout_rng = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(params, dropout_rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rng, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    state = [model.params, tx.init(model.params), jax.random.PRNGKey(0)]  # the params are donated to the step

    def step() -> float:
        *state[:], loss = train_step(*state)
        return float(loss)

    return step, {}, {"transformers": transformers.__version__, "jax": jax.__version__, "flax": flax.__version__,
                      "optax": optax.__version__}


# ----------------------------------------------------------------------------------------------------------------------
# The run


def start_workers(systems: list[str], ckpt: Path, ids: dict, args) -> dict[str, Worker]:
    workers = {}
    for system in systems:
        python = Path(sys.executable)
        if system == "fx":
            python = flax_python(args.no_build_flax)
            if python is None:
                continue
        settings = {"system": system, "ckpt": str(ckpt), "gpu": args.gpu, "dtype": args.dtype, **ids}
        try:
            workers[system] = Worker(system, [str(python), str(Path(__file__).resolve()), "--worker",
                                              json.dumps(settings)], timeout=600,
                                     env={"JAX_PLATFORMS": "cuda"} if args.gpu else None)
        except (RuntimeError, TimeoutError, OSError, json.JSONDecodeError) as err:
            if system != "fx":
                raise
            print(f"[flax] could not start transformers 4.46 Flax ({err}); continuing without it")
    return workers


def run(args, ckpt: Path, ids: dict) -> dict:
    """First steps, then interleaved rounds; returns system -> {"first_s", "steady_s", "runs_s", "cpu_s", "loss",
    "steal", "growth", stats..., "versions"}."""
    workers = start_workers(args.systems, ckpt, ids, args)
    replies = {name: [] for name in workers}
    out, first = {}, {}
    try:
        for name in list(workers):  # one after another: a compile has both cores to itself
            print(f"[first step] {SYSTEMS[name]} ...", flush=True)
            timeout = args.flax_timeout if name == "fx" else None
            t = time.perf_counter()
            try:
                reply = workers[name].request("step", timeout)
            except (TimeoutError, RuntimeError) as err:
                if name != "fx":
                    raise
                print(f"[flax] {err}; continuing without transformers 4.46 Flax", flush=True)
                workers.pop(name).close()
                out[name] = {"failed": str(err).splitlines()[0], "versions": {}}
                continue
            first[name] = {"step": time.perf_counter() - t}
            out[name] = {"first_s": first[name]["step"], "first_loss": reply["loss"], "first_growth": reply["growth"]}
            print(f"[first step] {SYSTEMS[name]}: {first[name]['step']:.1f} s, loss {reply['loss']:.4f}", flush=True)
        systems = {name: {"step": lambda name=name: replies[name].append(workers[name].request("step"))}
                   for name in workers}
        print(f"[timing] {args.repeats} interleaved rounds of {', '.join(workers)}", flush=True)
        timed = interleaved(systems, args.repeats, first)
        for name, worker_ in workers.items():
            growth = [r["growth"] for r in replies[name] if r["growth"] is not None]
            out[name].update(steady_s=timed[name]["step"]["steady_s"], runs_s=timed[name]["step"]["runs_s"],
                             steal=timed[name]["steal"], cpu_s=statistics.median(r["cpu_s"] for r in replies[name]),
                             faults=statistics.median(r["faults"] for r in replies[name]),
                             loss=replies[name][-1]["loss"], growth=max(growth) if growth else None,
                             **{k: v for k, v in worker_.request("stats").items() if k not in ("job", "s")},
                             versions=worker_.versions)
    finally:
        for worker_ in workers.values():
            worker_.close()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Report


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f}"


def report(res: dict, args) -> str:
    ok = {k: v for k, v in res.items() if "steady_s" in v}
    header = (f"{'system':<34}{'first s':>9}{'step s':>9}{'CPU s':>8}{'faults':>10}{'peak RSS GB':>13}"
              f"{'step growth GB':>16}{'XLA temp GB':>13}{'activations GB':>16}{'loss':>9}")
    lines = [header, "-" * len(header)]
    for name, r in res.items():
        if name not in ok:
            lines.append(f"{SYSTEMS[name]:<34}  did not run: {r['failed']}")
            continue
        act = r["temp"] - r["grads"] if "temp" in r else None
        lines.append(f"{SYSTEMS[name]:<34}{r['first_s']:>9.1f}{r['steady_s']:>9.3f}{r['cpu_s']:>8.1f}{r['faults']:>10.0f}"
                     f"{gb(r['peak_rss']):>13}{gb(r['growth']):>16}{gb(r.get('temp')):>13}{gb(act):>16}"
                     f"{r['loss']:>9.4f}" + (f"   GPU peak {gb(r.get('device_peak'))} GB" if args.gpu else ""))
    lines.append("")
    sq = ok.get("sq")
    base = args.case == "base" and args.batch == 4 and not args.gpu and args.dtype == "float32"  # the targets' case
    peak = "device_peak" if args.gpu else "peak_rss"
    if sq:
        for key, label in (("pt", "PyTorch"), ("pt-ckpt", "PyTorch with checkpointing"), ("fx", "Flax 4.46")):
            if key not in ok:
                continue
            r = ok[key]
            rounds = [a / b for a, b in zip(r["runs_s"], sq["runs_s"])]
            goal = TARGETS.get(f"{key}_speedup")
            verdict = f" (target >= {goal}x: {'met' if r['steady_s'] / sq['steady_s'] >= goal else 'MISSED'})" \
                if goal and base else ""
            lines.append(f"step: speechseq {r['steady_s'] / sq['steady_s']:.2f}x faster than {label} [rounds "
                         f"{min(rounds):.2f}-{max(rounds):.2f}x], CPU time {r['cpu_s'] / sq['cpu_s']:.2f}x less"
                         + verdict)
        verdict = f" (target <= {TARGETS['compile_s']:.0f} s: {'met' if sq['first_s'] <= TARGETS['compile_s'] else 'MISSED'})"
        lines.append(f"first step (trace + compile + run): speechseq {sq['first_s']:.1f} s" + (verdict if base else ""))
        if "pt" in ok:
            pt = ok["pt"]
            verdict = f" (target: at most PyTorch's: {'met' if sq[peak] <= pt[peak] else 'MISSED'})"
            lines.append(f"{'GPU peak memory' if args.gpu else 'peak RSS'} without remat: speechseq {gb(sq[peak])} GB, "
                         f"PyTorch {gb(pt[peak])} GB = {sq[peak] / pt[peak]:.2f}x" + (verdict if base else ""))
        for key in ("sq-layer", "sq-dots"):
            if key in ok:
                r = ok[key]
                ratio = (sq["temp"] - sq["grads"]) / max(r["temp"] - r["grads"], 1)
                verdict = f" (target >= {TARGETS['remat_activations']:.0f}x: " \
                          f"{'met' if ratio >= TARGETS['remat_activations'] else 'MISSED'})"
                lines.append(f"{SYSTEMS[key]}: activations {ratio:.2f}x lower than remat none (XLA temp minus "
                             f"gradients), {'GPU peak' if args.gpu else 'peak RSS'} {gb(r[peak])} GB, "
                             f"step {r['steady_s'] / sq['steady_s']:.2f}x "
                             f"remat none's" + (verdict if base else ""))
    steal = {k: v["steal"] for k, v in ok.items() if v.get("steal") is not None}
    if steal:
        lines.append("CPU time taken by the hypervisor (steal) during the timed steps: "
                     + ", ".join(f"{k} {100 * v:.1f}%" for k, v in steal.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# --profile: speechseq's step per XLA op


def profile(args, ckpt: Path) -> None:
    """One speechseq step (after a compile and a warm step) under ``jax.profiler``: time per XLA op kind and the top
    ops with their output shapes (``profile_decode``'s trace reader)."""
    import collections

    import jax

    from profile_decode import is_dot, op_shapes, op_times
    from speechseq import SpeechSeq2Seq
    from speechseq.training import OptimConfig, StepConfig, init_state, make_train_step
    from speechseq.training.step import check_batch

    model = SpeechSeq2Seq.from_pretrained(ckpt)
    optim = OptimConfig(schedule="constant", **OPTIM)
    train_step = make_train_step(model.config, optim, StepConfig(remat=args.remat))
    state = init_state(model.config, model.params, optim, seed=0)
    del model
    batch = jax.device_put(check_batch({"input_values": np.load(ckpt / "audio.npy"),
                                        "labels": np.load(ckpt / "labels.npy")}))
    compiled = train_step.jitted.lower(state, batch).compile()
    shapes = op_shapes(compiled.as_text())
    for _ in range(2):  # the second one warm
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory(prefix="speechseq-train-profile-") as trace:
        t = time.perf_counter()
        with jax.profiler.trace(trace, create_perfetto_trace=True):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        wall = time.perf_counter() - t
        total, calls = op_times(Path(trace))

    def stem(name: str) -> str:  # the op's kind: its name without XLA's ".N" suffix
        return name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name

    def kind(name: str) -> str:
        if name.startswith("conv"):
            return "convolutions"
        if is_dot(name):
            return "dots and YNNPACK fusions (ynn_fusion, dot)"
        return "copies, transposes" if "copy" in stem(name) or "transpose" in stem(name) else "element-wise and other"

    kinds, stems = collections.Counter(), collections.Counter()
    for name, us in total.items():
        kinds[kind(name)] += us
        stems[stem(name)] += us
    summed = sum(total.values())
    print(f"speechseq step, remat {args.remat}: {wall:.2f} s wall under the profiler; op time summed over threads "
          f"{summed / 1e6:.2f} s")
    for k, us in kinds.most_common():
        print(f"  {us / 1e6:8.3f} s  {100 * us / summed:5.1f}%  {k}")
    print("by op kind (seconds):")
    for k, us in stems.most_common(args.top // 2):
        print(f"  {us / 1e6:8.3f}  {k}")
    print(f"top {args.top} ops (seconds, calls, output shape):")
    for name, us in total.most_common(args.top):
        print(f"  {us / 1e6:8.3f}  x{calls[name]:<5} {name:<40} {shapes.get(name, '?')}")


# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model and 1 s of audio: a smoke test")
    size.add_argument("--small", action="store_true", help="examples/synth/make_model.py's model, batch 16 x 4 s")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(DEFAULT_SYSTEMS),
                        help=f"systems to run (default: {' '.join(DEFAULT_SYSTEMS)})")
    parser.add_argument("--skip-flax", action="store_true", help="leave out transformers 4.46 Flax")
    parser.add_argument("--no-build-flax", action="store_true", help="do not build the Flax venv when it is missing")
    parser.add_argument("--flax-timeout", type=float, default=1800,
                        help="seconds Flax's first step (its compile) may take before it is stopped (default 1800)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3, or 1 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="default 4, or 16 with --small, or 2 with --quick")
    parser.add_argument("--seconds", type=float, default=None, help="audio length (default 5, 4 with --small, "
                        "1 with --quick)")
    parser.add_argument("--labels", type=int, default=32, help="label tokens per example (default 32)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--gpu", action="store_true", help="speechseq and PyTorch on the CUDA GPU (Flax left out)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype: speechseq's StepConfig.dtype, PyTorch's autocast (default float32)")
    parser.add_argument("--profile", action="store_true", help="profile speechseq's step per XLA op instead")
    parser.add_argument("--remat", default="none", help="--profile: the remat policy (default none)")
    parser.add_argument("--top", type=int, default=25, help="--profile: ops to list")
    args = parser.parse_args()
    args.case = "quick" if args.quick else "small" if args.small else "base"
    defaults = {"quick": (2, 1.0, 1), "small": (16, 4.0, 3), "base": (4, 5.0, 3)}[args.case]
    args.batch = args.batch or defaults[0]
    seconds = args.seconds or defaults[1]
    args.repeats = args.repeats or defaults[2]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if (args.skip_flax or args.gpu or args.dtype != "float32") and "fx" in args.systems:
        args.systems.remove("fx")  # transformers 4.46 Flax: the CPU venv, float32 only
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several JAX workers share the GPU
    samples = int(seconds * 16000)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = {"quick": "tiny", "small": "examples/synth/make_model.py's", "base": "wav2vec2-base stable-LN + bert-base"}
    print(f"speechseq training-step benchmark, {datetime.date.today()}, {cpu_name()} ({os.cpu_count()} CPUs), "
          f"load average {os.getloadavg()[0]:.2f}" + (" (other work is running: wall times are noisy)"
                                                      if os.getloadavg()[0] > 0.5 else ""))
    print(f"model: {model[args.case]}, batch {args.batch} x {seconds:g} s audio, {args.labels} labels, {args.dtype}, "
          f"AdamW, repeats {args.repeats}" + (", on the GPU" if args.gpu else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="speechseq-train-bench-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        t = time.perf_counter()
        ids = build(ckpt, args.case, args.batch, samples, args.labels)
        print(f"[setup] checkpoint built and saved in {time.perf_counter() - t:.1f} s", flush=True)
        if args.profile:
            return profile(args, ckpt)
        res = run(args, ckpt, ids)
    print()
    print(report(res, args))
    for name, r in res.items():
        print(f"  {name}: {r.get('versions')}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1-minute; {os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
