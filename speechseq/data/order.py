"""Batch order: which manifest rows form each global batch of an epoch, a pure function of (seed, epoch, lengths).

Shuffles come from a counter-based hash (splitmix64 of the index under a key made from seed, epoch and a stream
number) sorted with a stable sort: integer arithmetic only, so the order does not depend on numpy's random
generators (whose streams may change between versions), on worker count, timing or the number of processes, and a
checkpoint written today resumes the same batches with another numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 [n]: a bijection of 64-bit integers that mixes every bit."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def permutation(n: int, seed: int, epoch: int, stream: int = 0) -> np.ndarray:
    """A pseudo-random permutation of ``range(n)`` (int64 [n]) determined by ``(seed, epoch, stream)``."""
    key = np.array([seed & _MASK], dtype=np.uint64)
    for part in (epoch, stream):
        key = _splitmix64(key ^ np.uint64(part & _MASK))
    # the hash is a bijection, so distinct indices never tie and the sort is a permutation
    return np.argsort(_splitmix64(np.arange(n, dtype=np.uint64) ^ key), kind="stable")


def length_grouped_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, epoch: int,
                           mega_batch_mult: int | None = None, drop_remainder: bool = True) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: positions into ``lengths`` [n], ``batch_size`` per batch (the last may
    be shorter unless ``drop_remainder``).

    As transformers' ``get_length_grouped_indices`` (LengthGroupedSampler, and the Flax speech examples): shuffle,
    cut into mega-batches of ``mega_batch_mult`` batches (default ``min(n // (4 * batch_size), 50)``, at least 1),
    sort each longest first, cut into batches; then the batch order is shuffled too (so batches of long rows are not
    all early) and the batch holding the longest row goes first, so an out-of-memory batch shows up at step 1.
    With ``drop_remainder`` the ``n % batch_size`` rows of the last, partial batch (the shortest of the last
    mega-batch, a different set each epoch) are left out of this epoch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    mult = mega_batch_mult or max(1, min(n // (batch_size * 4), 50))
    mega = mult * batch_size
    perm = permutation(n, seed, epoch, stream=0)
    # stable sort of -length: equal lengths keep their shuffled order
    order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in np.split(perm, range(mega, n, mega))]
                           ) if n else perm
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_remainder and batches and len(batches[-1]) < batch_size:
        batches.pop()
    batches = [batches[j] for j in permutation(len(batches), seed, epoch, stream=1)]
    if batches:
        first = int(np.argmax([lengths[b].max() for b in batches]))
        batches[0], batches[first] = batches[first], batches[0]
    return batches


def sequential_batches(n: int, batch_size: int, drop_remainder: bool = True) -> list[np.ndarray]:
    """Positions ``0..n-1`` in order, cut into batches (no shuffle, no grouping)."""
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if drop_remainder and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
