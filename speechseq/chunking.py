"""Long audio cut into pieces a model can decode: at pauses, or as overlapping windows whose tokens are stitched.

`pauses` cuts a clip into consecutive pieces of at most ``chunk`` samples: in the middle of every pause of at least
0.5 s (where a sentence ends), and a stretch between those that is still too long in the middle of the longest pause
within the second half of each piece, where a sentence or at least a word ends: no word is cut, so a model trained on
whole utterances sees what it was trained on, and the pieces' texts are simply joined. `trim` then drops what a piece
holds of a pause beyond 0.25 s at either end.

`windows` cuts a clip longer than ``chunk`` samples into windows of ``chunk`` samples whose neighbours overlap by
``stride_left + stride_right`` samples (transformers' ASR pipeline: ``chunk_length_s``, ``stride_length_s``), and
each window is decoded on its own, so memory and compiled shapes depend on the window length, not on the clip's
(the encoder's self-attention is quadratic in the frames). The last window is aligned to the clip's end, so it is a
full window with full context rather than a short tail.

The tokens of consecutive windows are merged where they agree: of every way to lay the start of the right window's
tokens over the end of the left's, the one with the highest fraction of equal tokens wins (longer overlaps win ties),
and the merged sequence takes the left's tokens up to the middle of that overlap and the right's after it, where
each window saw the most context (transformers' ``_find_longest_common_sequence``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

QUIET_FRAME_S = 0.01  # energy frames of 10 ms
QUIET_SPAN = 5  # the quietest 50 ms of a search range sets its noise floor
QUIET_DB = 10.0  # frames within this many dB of that floor are pause ...
QUIET_FLOOR = 1e-8  # ... and any frame below -80 dBFS (digital silence, dither)
RUNAWAY_RATE = 2.0  # a piece read at more than this many times its file's median tokens a second is redone
SENTENCE_PAUSE_S = 0.5  # a long clip is cut at every pause this long (longer than any within a sentence)


def pauses(audio: np.ndarray, chunk: int, rate: int) -> list[tuple[int, int]]:
    """Sample ranges ``[start, end)`` that tile ``[0, len(audio))``, each at most ``chunk`` samples: one range when the
    clip fits, else every piece ends in the middle of the longest pause within the second half of the ``chunk``
    samples after its start (the last one on a tie: pieces as long as they can be), and in the middle of every pause
    of at least ``SENTENCE_PAUSE_S`` (one piece per sentence: a model trained on single utterances reads two
    sentences and the long pause between them badly). A pause is a run of 10 ms frames whose mean power is within
    ``QUIET_DB`` of the quietest 50 ms of that range (the clip for the long pauses), or below
    ``QUIET_FLOOR``: the gap between sentences outlasts those between words, so pieces hold whole sentences where the
    clip allows. ``audio`` [N] is a mono waveform at ``rate`` Hz; the work is linear in N."""
    n = len(audio)
    frame = max(int(rate * QUIET_FRAME_S), 1)
    if chunk < 4 * frame * QUIET_SPAN:
        raise ValueError(f"pauses: a {chunk}-sample piece is too short to hold a pause of {frame * QUIET_SPAN} samples")
    if n <= chunk:
        return [(0, n)]
    power = _frame_power(audio, 0, n, frame)
    first, stop = _pause_runs(power)
    long = ((stop - first) * frame >= SENTENCE_PAUSE_S * rate) & (first > 0) & (stop < len(power))  # between sounds
    ends = [int(a * frame + (b - a) * frame // 2) for a, b in zip(first[long], stop[long])] + [n]
    out, start = [], 0
    for end in ends:
        while end - start > chunk:
            # frames wholly in the second half
            cut = _middle_of_longest_pause(power, -(-(start + chunk // 2) // frame), (start + chunk) // frame, frame)
            out.append((start, cut))
            start = cut
        if end > start:
            out.append((start, end))
            start = end
    return out


def halve(audio: np.ndarray, start: int, end: int, rate: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut in two in the middle of its longest pause (as in `pauses`) within its middle half, for
    a piece to be decoded again in two; one range when it is too short to search (under 0.1 s)."""
    frame = max(int(rate * QUIET_FRAME_S), 1)
    power = _frame_power(audio, start, end, frame)
    lo, hi = -(-len(power) // 4), 3 * len(power) // 4
    if hi - lo < QUIET_SPAN:
        return [(start, end)]
    cut = start + _middle_of_longest_pause(power, lo, hi, frame)
    return [(start, cut), (cut, end)]


def _middle_of_longest_pause(power: np.ndarray, lo: int, hi: int, frame: int) -> int:
    """The sample in the middle of the longest run of pause frames among frames ``[lo, hi)`` of ``power`` (the
    last of equals)."""
    first, stop = _pause_runs(power[lo:hi])
    k = len(first) - 1 - int(np.argmax((stop - first)[::-1]))
    return int((lo + first[k]) * frame + (stop[k] - first[k]) * frame // 2)


def _pause_runs(power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs ``[first, stop)`` of pause frames among frames with these powers (at least ``QUIET_SPAN``)."""
    still = power <= _pause_level(power)
    edges = np.diff(np.concatenate([[0], still.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def runaway(pieces: Sequence[tuple[int, int, int]], lengths: Sequence[int | None], sizes: Sequence[int],
            shortest: int) -> set[int]:
    """Which pieces ``(file, start, end)`` to decode again in halves: those of at least ``shortest`` samples, short of
    their whole file (``sizes``), whose decoding ran to the length limit (``lengths[k]`` None: no end-of-sequence)
    or spent more than ``RUNAWAY_RATE`` times as many tokens a second as the file's pieces do on median. A model
    trained on whole sentences can loop, or invent words, on a piece that starts or ends inside one; the file's own
    pieces say how fast its speech reads."""
    speed = [np.inf if n is None else n / (end - start) for (_, start, end), n in zip(pieces, lengths)]
    per_file: dict[int, list[float]] = {}
    for (i, _, _), v in zip(pieces, speed):
        per_file.setdefault(i, []).append(v)
    usual = {i: float(np.median(v)) for i, v in per_file.items()}
    return {k for k, (i, start, end) in enumerate(pieces) if shortest <= end - start < sizes[i]
            and (lengths[k] is None or speed[k] > RUNAWAY_RATE * usual[i])}


def trim(audio: np.ndarray, start: int, end: int, rate: int, keep_s: float = 0.25) -> tuple[int, int]:
    """``[start, end)`` without the pause beyond ``keep_s`` seconds at either end (a pause as in `pauses`: 10 ms
    frames within ``QUIET_DB`` of the piece's quietest 50 ms, or below ``QUIET_FLOOR``). A model trained on
    utterances with a fraction of a second of silence around them reads the speech of a piece that holds seconds of
    silence badly. A piece that is all pause (no 10 ms frame ``QUIET_DB`` above its quietest 50 ms: digital silence
    or steady noise, where a model only hallucinates) comes back empty, ``(start, start)``."""
    frame = max(int(rate * QUIET_FRAME_S), 1)
    power = _frame_power(audio, start, end, frame)
    if len(power) < QUIET_SPAN:
        return start, end
    loud = np.flatnonzero(power > _pause_level(power))
    if len(loud) == 0:
        return start, start
    keep = int(keep_s * rate)
    return max(start, start + int(loud[0]) * frame - keep), min(end, start + (int(loud[-1]) + 1) * frame + keep)


def _frame_power(audio: np.ndarray, start: int, end: int, frame: int) -> np.ndarray:
    """Mean power of each whole ``frame``-sample frame of ``audio[start:end]``."""
    frames = (end - start) // frame
    return np.square(np.asarray(audio[start:start + frames * frame], dtype=np.float64).reshape(frames, frame)).mean(1)


def _pause_level(power: np.ndarray) -> float:
    """The power at or below which a frame of a stretch with these frame powers (at least ``QUIET_SPAN``) is pause:
    ``QUIET_DB`` above the stretch's quietest ``QUIET_SPAN`` frames, and never below ``QUIET_FLOOR``."""
    floor = np.convolve(power, np.ones(QUIET_SPAN) / QUIET_SPAN, mode="valid").min()
    return max(float(floor) * 10 ** (QUIET_DB / 10), QUIET_FLOOR)


def windows(n: int, chunk: int, stride_left: int, stride_right: int) -> list[tuple[int, int]]:
    """Sample ranges ``[start, end)`` covering ``[0, n)``: one window when ``n <= chunk``, else windows of ``chunk``
    samples starting every ``chunk - stride_left - stride_right`` samples, the last one ending at ``n``."""
    if chunk <= 0 or stride_left < 0 or stride_right < 0:
        raise ValueError(f"windows: need chunk > 0 and strides >= 0, got {chunk}, {stride_left}, {stride_right}")
    step = chunk - stride_left - stride_right
    if step <= 0:
        raise ValueError(f"windows: the strides ({stride_left} + {stride_right} samples) leave no step in a "
                         f"{chunk}-sample chunk")
    if n <= chunk:
        return [(0, n)]
    out = []
    start = 0
    while start + chunk < n:
        out.append((start, start + chunk))
        start += step
    out.append((n - chunk, n))  # the tail as a whole window: more context than a short remainder
    return out


def merge(left: Sequence[int], right: Sequence[int], min_matches: int = 2) -> list[int]:
    """``left`` and ``right`` (token ids of overlapping windows, specials removed) as one sequence.

    Without an overlap of at least ``min_matches`` equal tokens the two are simply joined (speech in the overlap
    that only one window transcribed is kept).
    """
    left, right = list(left), list(right)
    best, overlap = 0.0, 0
    for i in range(1, min(len(left), len(right)) + 1):
        matches = sum(a == b for a, b in zip(left[len(left) - i:], right[:i]))
        score = matches / i + i / 10000.0  # the fraction that agrees; a longer overlap wins a tie
        if matches >= min_matches and score > best:
            best, overlap = score, i
    middle = overlap // 2
    return left[:len(left) - overlap + middle] + right[middle:]


def stitch(pieces: Sequence[Sequence[int]]) -> list[int]:
    """The token ids of consecutive windows of one clip merged left to right."""
    out: list[int] = []
    for piece in pieces:
        out = merge(out, piece)
    return out
