"""Times transformers 4.46 ``FlaxSpeechEncoderDecoderModel.generate`` under ``jax.jit`` (greedy and beam search).

Runs in its own venv (transformers==4.46.3, jax==0.4.30, flax==0.8.5); ``decode.py`` starts it as a subprocess:

    python flax446_generate.py CHECKPOINT_DIR SETTINGS_JSON

``CHECKPOINT_DIR`` is a PyTorch ``SpeechEncoderDecoderModel`` checkpoint (loaded with ``from_pt=True``) that also holds
``audio.npy`` [B, N] float32 (unpadded: no attention mask is passed, because 4.46's Flax speech encoder-decoder
``generate`` hands the sample-level mask to cross-attention, which needs a frame-level one, and fails).
``SETTINGS_JSON`` gives new_tokens, beams (list), repeats, start / pad / eos token ids. Prints one JSON line on stdout:
{"versions": ..., "encoder_s": ..., "results": [{"num_beams", "compile_s", "steady_s", "runs_s", "shape"}]}
"""

import json
import os
import statistics
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
    n_new, eos, repeats = settings["new_tokens"], settings["eos"], settings["repeats"]
    out = {"versions": {"transformers": transformers.__version__, "jax": jax.__version__, "flax": flax.__version__},
           "results": []}

    def timed(fn, *args):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t

    # encoder alone, for the breakdown
    encode = jax.jit(lambda params, x: model.encode(x, params=params).last_hidden_state)
    first = timed(encode, model.params, audio)
    runs = [timed(encode, model.params, audio) for _ in range(repeats)]
    out["encoder_s"] = statistics.median(runs)
    out["encoder_compile_s"] = first - out["encoder_s"]

    for beams in settings["beams"]:
        def generate(params, x, beams=beams):
            return model.generate(x, params=params, max_length=n_new + 1, num_beams=beams,
                                  do_sample=False, eos_token_id=eos, suppress_tokens=[eos],
                                  pad_token_id=settings["pad"], decoder_start_token_id=settings["start"]).sequences

        jitted = jax.jit(generate)
        first = timed(jitted, model.params, audio)
        runs = [timed(jitted, model.params, audio) for _ in range(repeats)]
        seqs = np.asarray(jitted(model.params, audio))
        steady = statistics.median(runs)
        out["results"].append({"num_beams": beams, "compile_s": first - steady, "steady_s": steady, "runs_s": runs,
                               "shape": list(seqs.shape),
                               "eos_count": int((seqs[:, 1:] == eos).sum())})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
