"""Long audio: cuts at pauses (tiling, bounds, the quietest span chosen), the window plan (coverage, overlap, a full
last window) and the stitching of overlapping windows' tokens, on fixed signals and sequences; the end-to-end checks
of chunked transcription are in tests/test_transcribe.py."""

from __future__ import annotations

import numpy as np
import pytest

from speechseq.chunking import halve, merge, pauses, runaway, stitch, trim, windows

RATE = 1000  # 10-sample energy frames


def _speech(layout: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Noise bursts ("words") and quiet stretches: ``layout`` is (seconds, amplitude) pairs at ``RATE``."""
    rng = np.random.default_rng(seed)
    return np.concatenate([amp * rng.standard_normal(int(sec * RATE)) for sec, amp in layout])


def test_pauses_cut_in_the_quietest_gap_of_each_second_half():
    # words of 0.4 s with 0.06 s word gaps at 0.01; every 1.5 s a sentence gap of 0.15 s in near silence
    sentence = [(0.4, 1.0), (0.06, 0.01), (0.4, 1.0), (0.06, 0.01), (0.4, 1.0), (0.15, 0.0005)]
    audio = _speech(sentence * 8)
    gaps = np.cumsum([int(sec * RATE) for sec, _ in sentence * 8])[5::6]  # the sentence gaps' ends
    spans = pauses(audio, 2 * RATE, RATE)
    assert spans[0][0] == 0 and spans[-1][1] == len(audio)
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # consecutive, no overlap, no gap
    assert all(0 < e - s <= 2 * RATE for s, e in spans)
    for _, cut in spans[:-1]:  # inside a sentence gap: ends within its 150 samples
        assert any(g - 150 < cut < g for g in gaps), (cut, gaps)
    # without sentence gaps, cuts fall in word gaps, never inside a word
    words = _speech([(0.4, 1.0), (0.06, 0.01)] * 30, seed=1)
    ends = np.cumsum([int(sec * RATE) for sec, _ in [(0.4, 1.0), (0.06, 0.01)] * 30])[1::2]
    for _, cut in pauses(words, 2 * RATE, RATE)[:-1]:
        assert any(g - 60 < cut < g for g in ends), cut


@pytest.mark.parametrize("n", [0, 5, 2000])
def test_pauses_leave_a_short_clip_whole(n):
    assert pauses(np.ones(n, np.float32), 2000, RATE) == [(0, n)]


def test_trim_keeps_a_quarter_second_of_pause_around_the_sound():
    audio = _speech([(2.0, 0.001), (1.0, 1.0), (0.1, 0.001), (0.5, 1.0), (3.0, 0.001)])  # noise, speech, gap, ...
    assert trim(audio, 0, len(audio), RATE) == (1750, 3850)  # 0.25 s before 2.0 s and after 3.6 s; the gap stays
    assert trim(audio, 2000, 3600, RATE) == (2000, 3600)  # nothing to trim
    assert trim(audio, 3700, 6600, RATE) == (3700, 3700)  # all pause (steady noise): nothing left
    assert trim(np.zeros(3000), 0, 3000, RATE) == (0, 0)  # digital silence: nothing left
    assert trim(audio, 0, 3, RATE) == (0, 3)  # too short to judge


def test_pauses_cut_a_long_clip_at_every_long_pause():
    # sentences of 1 s with 0.2 s pauses inside, 0.6 s pauses between them: with room for several sentences a piece,
    # every piece is one sentence cut in the middle of the long pauses; the short ones are never cut
    sentence = [(0.4, 1.0), (0.2, 0.001), (0.4, 1.0), (0.6, 0.001)]
    audio = _speech(sentence * 6)
    spans = pauses(audio, 5 * RATE, RATE)
    assert [e for _, e in spans] == [1300 + 1600 * k for k in range(5)] + [len(audio)]
    assert pauses(audio[:4000], 5 * RATE, RATE) == [(0, 4000)]  # a clip that fits stays whole


def test_halve_cuts_in_the_longest_pause_of_the_middle_half():
    # 4.4 s: speech, a 0.3 s gap at 1.5-1.8 s, speech, a longer 0.5 s gap at 3.5-4.0 s, speech; the middle half
    # (1.1-3.3 s) holds only the short gap: the cut is in its middle
    audio = _speech([(1.5, 1.0), (0.3, 0.001), (1.7, 1.0), (0.5, 0.001), (0.4, 1.0)])
    offset = 500  # a piece of a longer clip: ranges stay in the clip's samples
    padded = np.concatenate([np.ones(offset, np.float32), audio])
    [(a, cut), (c, b)] = halve(padded, offset, offset + len(audio), RATE)
    assert (a, b) == (offset, offset + len(audio)) and cut == c
    assert abs(cut - offset - 1650) <= 10
    assert halve(padded, offset, offset + 90, RATE) == [(offset, offset + 90)]  # too short to search


def test_runaway_pieces_ran_to_the_limit_or_read_too_fast():
    # file 0: five 3 s pieces read at 15-16 tokens, one at 40 (over twice the median), one without an end; file 1:
    # one piece that is the whole file and runs on (nothing to halve it into that would not be the file again)
    pieces = [(0, 3000 * k, 3000 * (k + 1)) for k in range(7)] + [(1, 0, 3000)]
    lengths = [15, 16, 40, 15, 16, 15, None, None]
    assert runaway(pieces, lengths, [21000, 3000], shortest=2000) == {2, 6}
    assert runaway(pieces, lengths, [21000, 3000], shortest=3001) == set()  # all too short to halve
    assert runaway(pieces[:2], [None, None], [21000], shortest=2000) == {0, 1}  # none ended: all run on


def test_pauses_work_on_silence_and_reject_a_piece_shorter_than_a_pause():
    spans = pauses(np.zeros(10_000, np.float32), 1000, RATE)
    assert spans[-1][1] == 10_000 and all(0 < e - s <= 1000 for s, e in spans)
    with pytest.raises(ValueError, match="too short"):
        pauses(np.zeros(1000), 150, RATE)


@pytest.mark.parametrize("n", [1, 99, 100, 101, 250, 1000, 1037])
def test_windows_cover_the_clip_with_the_stated_overlap(n):
    chunk, left, right = 100, 15, 10
    spans = windows(n, chunk, left, right)
    assert spans[0][0] == 0 and spans[-1][1] == n
    if n <= chunk:
        assert spans == [(0, n)]
        return
    assert all(end - start == chunk for start, end in spans)  # every window full, the last one too
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 < e0 < e1  # ordered, overlapping, never a gap
        assert e0 - s1 >= left + right  # at least the stated overlap (the last one may overlap more)
    assert all(s1 - s0 == chunk - left - right for (s0, _), (s1, _) in zip(spans[:-1], spans[1:-1]))


def test_windows_reject_strides_that_leave_no_step():
    with pytest.raises(ValueError, match="no step"):
        windows(1000, 100, 50, 50)


def test_merge_takes_each_side_up_to_the_middle_of_the_agreement():
    # the overlap is "7 8 9 10" in both; left's last token and right's first are edge guesses that differ
    left = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99]
    right = [98, 7, 8, 9, 10, 11, 12, 13]
    assert merge(left, right) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]


def test_merge_without_agreement_joins():
    assert merge([1, 2, 3], [4, 5, 6]) == [1, 2, 3, 4, 5, 6]
    assert merge([1, 2, 3], [3, 4]) == [1, 2, 3, 3, 4]  # one shared token is not evidence of an overlap
    assert merge([], [4, 5]) == [4, 5] and merge([4, 5], []) == [4, 5]


def test_stitch_recovers_a_sequence_from_noisy_overlapping_pieces():
    """Pieces of a long random sequence with overlaps of 6-10 tokens and one wrong token at each piece's edges
    (a window cut mid-word): the stitched sequence equals the original."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 500, 400).tolist()
    pieces, start = [], 0
    while start < len(truth):
        end = min(start + int(rng.integers(30, 50)), len(truth))
        piece = truth[start:end]
        if start > 0:
            piece = [1000] + piece[1:]
        if end < len(truth):
            piece = piece[:-1] + [1001]
        pieces.append(piece)
        if end == len(truth):
            break
        start = end - int(rng.integers(6, 11))
    assert len(pieces) > 5
    assert stitch(pieces) == truth
