"""One competitor of ``decode.py`` in a process of its own: transformers 5 PyTorch, or transformers 4.46 Flax under
``jax.jit``, timing one call per request so that ``decode.py`` can interleave its calls with the other systems'.

    python competitor.py pytorch|flax|speechseq CHECKPOINT_DIR SETTINGS_JSON

``speechseq`` runs speechseq as ``PYTHONPATH`` finds it (``decode.py --baseline REF``: this tree against a git
worktree of REF, each in a process of its own, for an A/B of a change in one run).
``pytorch`` runs in the main venv (torch==2.13.0, transformers 5); ``flax`` in ``benchmarks/.venv-flax446``
(transformers==4.46.3, jax==0.4.30, flax==0.8.5), loading the PyTorch checkpoint with ``from_pt=True``.
``CHECKPOINT_DIR`` is a ``SpeechEncoderDecoderModel`` checkpoint that also holds ``audio.npy`` [B, N] float32
(unpadded: no attention mask is passed, because 4.46's Flax speech encoder-decoder ``generate`` hands the
sample-level mask to cross-attention, which needs a frame-level one, and fails). ``SETTINGS_JSON`` gives
new_tokens, beams (list), start / pad / eos token ids.

Protocol (one JSON object per line): it prints {"ready": true, "versions": {...}} once the model is loaded, then
answers each request line on stdin, a job name ("encoder" or a num_beams value as a string), with
{"job": name, "s": seconds for one call, "shape": [...], "eos_count": n} (no shape for the encoder).
An empty line or the end of input ends it.
"""

import json
import os
import sys
import time

import numpy as np


def generate_kwargs(settings: dict, beams: int) -> dict:
    eos = settings["eos"]
    return dict(num_beams=beams, do_sample=False, eos_token_id=eos, suppress_tokens=[eos],
                pad_token_id=settings["pad"], decoder_start_token_id=settings["start"])


def pytorch_jobs(ckpt: str, settings: dict, audio: np.ndarray) -> tuple[dict, dict]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    model = transformers.SpeechEncoderDecoderModel.from_pretrained(ckpt).eval()
    x = torch.from_numpy(audio)

    def generator(beams: int):
        def generate():
            with torch.inference_mode():
                return model.generate(input_values=x, max_new_tokens=settings["new_tokens"],
                                      **generate_kwargs(settings, beams)).numpy()
        return generate

    def encoder():
        with torch.inference_mode():
            model.encoder(x)

    jobs = {"encoder": encoder, **{str(b): generator(b) for b in settings["beams"]}}
    return jobs, {"transformers": transformers.__version__, "torch": torch.__version__,
                  "threads": torch.get_num_threads()}


def flax_jobs(ckpt: str, settings: dict, audio: np.ndarray) -> tuple[dict, dict]:
    import flax
    import jax
    import transformers
    from transformers import FlaxSpeechEncoderDecoderModel

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(ckpt, from_pt=True)
    x = jax.device_put(audio)

    def generator(beams: int):
        jitted = jax.jit(lambda params, x: model.generate(x, params=params, max_length=settings["new_tokens"] + 1,
                                                          **generate_kwargs(settings, beams)).sequences)
        return lambda: np.asarray(jitted(model.params, x))

    encode = jax.jit(lambda params, x: model.encode(x, params=params).last_hidden_state)
    jobs = {"encoder": lambda: jax.block_until_ready(encode(model.params, x)),
            **{str(b): generator(b) for b in settings["beams"]}}
    return jobs, {"transformers": transformers.__version__, "jax": jax.__version__, "flax": flax.__version__}


def speechseq_jobs(ckpt: str, settings: dict, audio: np.ndarray) -> tuple[dict, dict]:
    """speechseq as ``PYTHONPATH`` finds it (``decode.py --baseline REF`` runs this tree and a worktree of REF)."""
    import jax

    import speechseq
    from speechseq import SpeechSeq2Seq
    from speechseq import model as M

    model = SpeechSeq2Seq.from_pretrained(ckpt)
    x = jax.device_put(audio)

    def generator(beams: int):
        return lambda: np.asarray(model.generate(x, max_new_tokens=settings["new_tokens"],
                                                 **generate_kwargs(settings, beams)))

    jobs = {"encoder": lambda: jax.block_until_ready(M.encode_jit(model.config, model.params, x)) and None,
            **{str(b): generator(b) for b in settings["beams"]}}
    return jobs, {"speechseq": os.path.dirname(speechseq.__file__), "jax": jax.__version__}


def serve(jobs: dict, versions: dict, describe=None) -> None:
    """The protocol: prints {"ready": true, "versions": versions}, then runs ``jobs[name]()`` for each request line
    and prints {"job": name, "s": seconds, **describe(result)} (``describe`` only for a result that is not None),
    until an empty line or the end of input."""
    print(json.dumps({"ready": True, "versions": versions}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        t = time.perf_counter()
        out = jobs[name]()
        reply = {"job": name, "s": time.perf_counter() - t}
        if out is not None and describe is not None:
            reply.update(describe(out))
        print(json.dumps(reply), flush=True)


def main() -> None:
    system, ckpt, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    audio = np.load(os.path.join(ckpt, "audio.npy"))
    jobs, versions = {"pytorch": pytorch_jobs, "flax": flax_jobs, "speechseq": speechseq_jobs}[system](
        ckpt, settings, audio)
    serve(jobs, versions, lambda out: {"shape": list(out.shape), "eos_count": int((out[:, 1:] == settings["eos"]).sum())})


if __name__ == "__main__":
    main()
