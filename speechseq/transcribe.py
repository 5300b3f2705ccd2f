"""Batch transcription: files in, text out. Long files are decoded in pieces cut at pauses, or in overlapping windows
whose tokens are stitched back together (``speechseq.chunking``), so memory does not grow with a file's length;
pieces and short files share length-bucketed batches, padded to a few shapes so the number of compiled programs
stays bounded."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from speechseq.audio import batches_by_length, load_audio
from speechseq.chunking import halve, pauses, runaway, stitch, trim, windows
from speechseq.errors import InputError
from speechseq.processor import Processor
from speechseq.speech_seq2seq import SpeechSeq2Seq

PIECE_TAIL_S = 0.2  # silence after each piece cut at pauses
RUNAWAY_SPLIT_S = 2.0  # a piece cut at pauses decoded to the length limit is halved and decoded again down to this


def transcribe(model: str | os.PathLike | SpeechSeq2Seq, files: Sequence[str | os.PathLike], *, batch_size: int = 8,
               dtype: str = "float32", progress: bool = True, processor: Processor | None = None,
               chunk_length_s: float | None = 30.0, stride_length_s: float | None = None,
               chunking: str = "pauses", **generate_kwargs: Any) -> Iterator[dict]:
    """Yield ``{"file", "text", "seconds", "audio_seconds"}`` per file, in input order.

    Audio is resampled to the checkpoint's rate. A file longer than ``chunk_length_s`` seconds (``None`` or 0: never) is
    cut into pieces of at most that length: ``chunking="pauses"`` cuts it at every pause of 0.5 s or more and each
    stretch still too long in the longest pause of its pieces' second half (``chunking.pauses``), trims each piece's
    pause beyond 0.25 s at either end and drops pieces that are all pause (``chunking.trim``), adds 0.2 s of silence
    after each and joins the pieces' texts (a piece of at least ``RUNAWAY_SPLIT_S`` seconds whose decoding reaches the
    length limit without an end-of-sequence token, or spends over twice the tokens a second its file's pieces do on
    median, ``chunking.runaway``, is cut in two at its longest pause near the middle, ``chunking.halve``, and the halves
    are decoded in its place, again while they run on); ``"windows"`` cuts windows of that length overlapping their
    neighbours by ``stride_length_s`` on each side (default a sixth of the window, as transformers' ASR pipeline) and
    stitches the windows' tokens into one text (``stride_length_s`` is for windows only). Pauses are the default: a
    seq2seq model reads a piece that starts and ends in a pause as the utterances it was trained on, where a window cut
    inside a word makes it invent words. Files and pieces are grouped by length into batches of at most ``batch_size``
    rows, padded to a power of two rows (a lone file is one row) and to a length bucket, and decoded with ``generate``:
    the checkpoint's generation settings (max length, beams, ...) unless ``generate_kwargs`` (``num_beams``,
    ``max_new_tokens``, ...; ``None`` values are ignored) override them.
    """
    if not isinstance(model, SpeechSeq2Seq):
        processor = processor or Processor.from_pretrained(model)
        model = SpeechSeq2Seq.from_pretrained(model, dtype=dtype)
    elif processor is None:
        raise InputError("processor: required when a model object is passed")
    # the settings (and the memory a batch of them needs) are checked before any audio is read
    gen = model.generation_config(batch=batch_size, **generate_kwargs)
    fe = processor.feature_extractor
    if chunking not in ("pauses", "windows"):
        raise InputError(f"chunking: 'pauses' or 'windows', got {chunking!r}")
    chunk, stride = _window_samples(chunk_length_s, stride_length_s, fe.sampling_rate)
    if chunking == "pauses" and stride_length_s is not None:
        raise InputError("stride_length_s: only windows overlap; pass chunking='windows' (--chunking windows) with it")
    if chunking == "pauses" and 0 < chunk < fe.sampling_rate:
        raise InputError(f"chunk_length_s: pieces cut at pauses need at least 1 s, got {chunk_length_s:g}")
    audios = [load_audio(f, fe.sampling_rate) for f in files]
    rate = fe.sampling_rate

    def spans(audio: np.ndarray) -> list[tuple[int, int]]:
        if not chunk:
            return [(0, len(audio))]
        if chunking == "pauses":
            cuts = pauses(audio, chunk, rate)
            return cuts if len(cuts) == 1 else speech(audio, cuts)
        # a window of a long file that holds no sound (digital silence) has nothing to say, and a filterbank
        # extractor's per-utterance normalisation would divide by its zero deviation
        cuts = windows(len(audio), chunk, stride, stride)
        return [(a, b) for a, b in cuts if len(cuts) == 1 or audio[a:b].min() < audio[a:b].max()]

    def speech(audio: np.ndarray, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        # pieces without seconds of pause at either end, and none that is all pause (silence or steady noise)
        return [(a, b) for a, b in (trim(audio, a, b, rate) for a, b in cuts) if b > a]

    pieces = []  # (file, first sample, end) of every piece to decode
    for i, audio in enumerate(audios):
        pieces += [(i, start, end) for start, end in spans(audio)]
    # a piece cut at a pause ends as an utterance does, in silence: without it a model trained on whole utterances
    # hears speech run on at the cut and does not stop
    tail = np.zeros(int(PIECE_TAIL_S * rate) if chunking == "pauses" else 0, np.float32)
    tokens: list[np.ndarray | None] = [None] * len(pieces)
    seconds = [0.0] * len(files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pieces), desc="transcribe", unit="window" if len(pieces) > len(files) else "file",
                   leave=False)

    def decode(todo: list[int]) -> None:
        for batch in batches_by_length([pieces[k][2] - pieces[k][1] for k in todo], batch_size):
            batch = [todo[j] for j in batch]
            t0 = time.perf_counter()
            rows = [np.concatenate([audios[i][start:end], tail]) if end - start < len(audios[i]) else audios[i]
                    for i, start, end in (pieces[k] for k in batch)]
            # a few batch shapes (powers of two up to batch_size), so few programs compile and nothing is padded
            # beyond twice its rows
            rows += [rows[0]] * (min(batch_size, 1 << (len(rows) - 1).bit_length()) - len(rows))
            feats = fe(rows, padding="buckets")
            seqs = model.generate(**feats, **generate_kwargs)  # input_values or input_features, + attention_mask
            per_input = seqs.shape[0] // len(rows)
            took = (time.perf_counter() - t0) / len(batch)
            for j, k in enumerate(batch):
                tokens[k] = seqs[j * per_input]
                seconds[pieces[k][0]] += took
            if bar:
                bar.update(len(batch))

    try:
        decode(list(range(len(pieces))))
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, tuple) else (gen.eos_token_id,)
        while chunking == "pauses" and chunk and None not in eos:
            # a piece the decoder ran on to the length limit, or read at over twice its file's usual token rate
            # (chunking.runaway), is decoded again in two halves cut at a pause (its first token, the decoder's
            # start, may be the EOS id too, as in BART)
            ends = [np.flatnonzero(np.isin(np.asarray(t)[1:], eos)) for t in tokens]
            again = runaway(pieces, [e[0] + 1 if len(e) else None for e in ends], [len(a) for a in audios],
                            int(RUNAWAY_SPLIT_S * rate))
            if not again:
                break
            new_pieces, new_tokens, todo = [], [], []
            for k, (i, start, end) in enumerate(pieces):
                if k not in again:
                    new_pieces.append((i, start, end))
                    new_tokens.append(tokens[k])
                    continue
                for a, b in speech(audios[i], halve(audios[i], start, end, rate)):
                    todo.append(len(new_pieces))
                    new_pieces.append((i, a, b))
                    new_tokens.append(None)
            pieces[:], tokens[:] = new_pieces, new_tokens
            if bar:
                bar.total += len(todo)
                bar.refresh()
            decode(todo)
    finally:
        if bar:  # now, not when the failed frame is collected: clearing its line then would erase the error
            bar.close()
    special = set(processor.tokenizer.all_special_ids)
    for i, f in enumerate(files):
        mine = [t for (owner, _, _), t in zip(pieces, tokens) if owner == i]
        if chunking == "pauses" or len(mine) == 1:  # pieces that do not overlap: their texts in order
            text = " ".join(t for t in (processor.decode(m, skip_special_tokens=True).strip() for m in mine) if t)
        else:
            text = processor.decode(stitch([[t for t in m if t not in special] for m in mine]),
                                    skip_special_tokens=True).strip()
        yield {"file": str(Path(f)), "text": text,
               "seconds": round(seconds[i], 4), "audio_seconds": round(len(audios[i]) / fe.sampling_rate, 3)}


def _window_samples(chunk_length_s: float | None, stride_length_s: float | None, rate: int) -> tuple[int, int]:
    """(window, stride) in samples; (0, 0) when files are decoded whole."""
    if not chunk_length_s:
        return 0, 0
    stride = chunk_length_s / 6 if stride_length_s is None else stride_length_s
    if not chunk_length_s > 0 or not 0 <= 2 * stride < chunk_length_s:
        raise InputError(f"stride_length_s: {stride:g} s on each side of a {chunk_length_s:g} s window leaves no "
                         "step; need 0 <= 2 x stride_length_s < chunk_length_s (chunk_length_s > 0, or 0 to decode "
                         "files whole)")
    return int(round(chunk_length_s * rate)), int(round(stride * rate))
