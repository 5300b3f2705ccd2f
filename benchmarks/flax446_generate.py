"""Times transformers 4.46 ``FlaxSpeechEncoderDecoderModel.generate`` under ``jax.jit`` (greedy and beam search).

Runs in its own venv (transformers==4.46.3, jax==0.4.30, flax==0.8.5); ``decode.py`` starts it as a subprocess and
talks to it one line at a time, so that its calls can be timed in the same rounds as the other systems':

    python flax446_generate.py CHECKPOINT_DIR SETTINGS_JSON

``CHECKPOINT_DIR`` is a PyTorch ``SpeechEncoderDecoderModel`` checkpoint (loaded with ``from_pt=True``) that also holds
``audio.npy`` [B, N] float32 (unpadded: no attention mask is passed, because 4.46's Flax speech encoder-decoder
``generate`` hands the sample-level mask to cross-attention, which needs a frame-level one, and fails).
``SETTINGS_JSON`` gives new_tokens, beams (list), start / pad / eos token ids.

Protocol (one JSON object per line): it prints {"ready": true, "versions": {...}} once the model is loaded, then
answers each request line on stdin, a job name ("encoder" or a num_beams value as a string), with
{"job": name, "s": seconds for one call, "first": whether that call compiled, "shape": [...], "eos_count": n}.
An empty line or end of input ends it.
"""

import json
import os
import sys
import time

import jax
import numpy as np


def main() -> None:
    ckpt, settings = sys.argv[1], json.loads(sys.argv[2])
    import flax
    import transformers
    from transformers import FlaxSpeechEncoderDecoderModel

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(ckpt, from_pt=True)
    audio = jax.device_put(np.load(os.path.join(ckpt, "audio.npy")))
    n_new, eos = settings["new_tokens"], settings["eos"]

    def generator(beams: int):
        def generate(params, x):
            return model.generate(x, params=params, max_length=n_new + 1, num_beams=beams,
                                  do_sample=False, eos_token_id=eos, suppress_tokens=[eos],
                                  pad_token_id=settings["pad"], decoder_start_token_id=settings["start"]).sequences
        return jax.jit(generate)

    jobs = {"encoder": jax.jit(lambda params, x: model.encode(x, params=params).last_hidden_state)}
    jobs.update({str(b): generator(b) for b in settings["beams"]})
    called = set()
    print(json.dumps({"ready": True, "versions": {"transformers": transformers.__version__, "jax": jax.__version__,
                                                  "flax": flax.__version__}}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        t = time.perf_counter()
        out = jax.block_until_ready(jobs[name](model.params, audio))
        reply = {"job": name, "s": time.perf_counter() - t, "first": name not in called}
        called.add(name)
        if name != "encoder":
            seqs = np.asarray(out)
            reply.update(shape=list(seqs.shape), eos_count=int((seqs[:, 1:] == eos).sum()))
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
