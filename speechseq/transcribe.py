"""Batch transcription: files in, text out, with length-bucketed batches of a fixed size so the number of
compiled programs stays bounded (one per audio-length bucket)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from speechseq.audio import batches_by_length, load_audio
from speechseq.processor import Processor
from speechseq.speech_seq2seq import SpeechSeq2Seq


def transcribe(model: str | os.PathLike | SpeechSeq2Seq, files: Sequence[str | os.PathLike], *, batch_size: int = 8,
               dtype: str = "float32", progress: bool = True, processor: Processor | None = None,
               **generate_kwargs: Any) -> Iterator[dict]:
    """Yield ``{"file", "text", "seconds", "audio_seconds"}`` per file, in input order.

    Audio is resampled to the checkpoint's rate, grouped by length into batches of ``batch_size`` rows (short
    batches are filled with copies so the batch shape never changes), padded to a length bucket and decoded
    with ``generate``: the checkpoint's generation settings (max length, beams, ...) unless ``generate_kwargs``
    (``num_beams``, ``max_new_tokens``, ...; ``None`` values are ignored) override them.
    """
    if not isinstance(model, SpeechSeq2Seq):
        processor = processor or Processor.from_pretrained(model)
        model = SpeechSeq2Seq.from_pretrained(model, dtype=dtype)
    elif processor is None:
        raise ValueError("processor: required when a model object is passed")
    fe = processor.feature_extractor
    audios = [load_audio(f, fe.sampling_rate) for f in files]
    results: list[dict | None] = [None] * len(files)
    batches = batches_by_length([len(a) for a in audios], batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="transcribe", unit="file", leave=False)
    for batch in batches:
        t0 = time.perf_counter()
        rows = [audios[i] for i in batch]
        rows += [rows[0]] * (batch_size - len(rows))  # fixed batch shape: no recompilation for a short last batch
        feats = fe(rows, padding="buckets")
        seqs = model.generate(feats["input_values"], feats.get("attention_mask"), **generate_kwargs)
        per_input = seqs.shape[0] // batch_size
        texts = processor.batch_decode(seqs[: len(batch) * per_input : per_input], skip_special_tokens=True)
        seconds = (time.perf_counter() - t0) / len(batch)
        for i, text in zip(batch, texts):
            results[i] = {"file": str(Path(files[i])), "text": text.strip(), "seconds": round(seconds, 4),
                          "audio_seconds": round(len(audios[i]) / fe.sampling_rate, 3)}
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    yield from (r for r in results if r is not None)
