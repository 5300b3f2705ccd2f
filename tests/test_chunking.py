"""Long audio: the window plan (coverage, overlap, a full last window) and the stitching of overlapping windows'
tokens, on fixed sequences; the end-to-end check of chunked transcription is in tests/test_transcribe.py."""

from __future__ import annotations

import numpy as np
import pytest

from speechseq.chunking import merge, stitch, windows


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
