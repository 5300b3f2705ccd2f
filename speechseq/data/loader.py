"""``Loader``: manifest rows -> padded, length-grouped training batches; deterministic, sharded and resumable.

How it works:

1. **Scan** (at construction, every process the same): each row's text is checked and tokenised and its audio file's
   header read (``soundfile.info``, threads), giving its length at the feature extractor's rate. Bad rows are counted
   in ``skipped`` by reason, or stop the run with a one-line ``InputError`` naming the manifest row
   (``on_bad="raise"``).
2. **Plan** (``order.py``): the epoch's global batches are a pure function of (seed, epoch, the usable rows'
   lengths): length-grouped and shuffled as transformers' ``LengthGroupedSampler``. Each global batch gets its padded
   shape from the scan: audio to the smallest audio bucket holding its longest row, labels to the smallest label
   bucket holding its longest label, so every process agrees on it without talking to the others.
3. **Shard**: process ``p`` of ``P`` takes rows ``[p*b, (p+1)*b)`` of each global batch (``b = batch_size / P``), so
   the processes' batches concatenated in process order are exactly the one-process batch.
4. **Load**: worker threads read, resample (``speechseq.audio.load_audio``) and featurise (the processor, one row at a
   time as transformers' ``prepare_dataset`` does) the rows of the next batches while the current one trains; the
   results are assembled in plan order, so neither worker count nor timing changes a batch.
5. **State**: ``get_state()`` is ``{seed, epoch, batch}`` (the next batch to yield) plus a fingerprint of the usable
   rows and settings; ``set_state`` continues with exactly the batches the uninterrupted iterator would have yielded,
   with any number of workers or processes.

Why not grain: grain's ``IndexSampler`` shards records per process and batches each shard on its own, so a
process's batch is not a slice of a global batch and length-grouped padding shapes could differ between processes;
its iterator state also records per-worker positions and needs the same worker count on restore. The plan above is
small, and global by construction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from speechseq.audio import DEFAULT_BUCKET_SECONDS, batches_by_length, bucket_length, load_audio
from speechseq.config import check_number
from speechseq.data.manifest import Example, check_on_bad
from speechseq.data.order import length_grouped_batches, sequential_batches
from speechseq.errors import ConfigError, InputError, first_line

if TYPE_CHECKING:
    from speechseq.processor import Processor

# label lengths in tokens; beyond the last (and without max_label_tokens) multiples of it
DEFAULT_LABEL_BUCKETS = (16, 32, 64, 128, 256, 512)
REASONS = ("malformed", "missing_file", "unreadable", "empty_text", "audio_too_short", "audio_too_long",
           "labels_too_long")
STATE_VERSION = 1


@dataclass(frozen=True)
class _Spec:
    """One batch to build: this process's example indices (None = a padding row), the global batch's padded audio
    length in samples, label length in tokens, and whether the decoder start token is stripped from the labels."""

    epoch: int
    index: int
    rows: tuple[int | None, ...]
    samples: int
    tokens: int
    strip: bool


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS, MKL, BLIS) on one thread inside the block, as it was after it (``threadpoolctl``).

    The loader's threads featurise audio (the filterbank's mel projection is a BLAS ``dot``) beside a running XLA
    program that already uses every core. A multi-threaded BLAS gains nothing on one row's small matrices, and its
    helper threads spin between calls, taking a core from XLA's: on a 2-core CPU the synth recogniser's first-epoch
    step was 8-15% slower with them (``examples/synth/README.md``). ``speechseq train`` and ``evaluate`` run inside
    this; a loop of your own that iterates a ``Loader`` while it trains should too."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


class Loader:
    """Batches of ``{"input_values" [B, N] float32, "attention_mask" [B, N] int32 (when the feature extractor
    returns one), "labels" [B, T] int32 (-100 = ignored), "ids": list[str | None]}`` for training (``__iter__``,
    endless) and evaluation (``epoch()``, one pass).

    ``batch_size`` is the global batch; each of ``process_count`` processes gets ``batch_size // process_count``
    rows of it (B above). N is one of the audio buckets (``audio_buckets`` seconds at the feature extractor's rate,
    capped at ``max_audio_seconds``) and T one of the label buckets (``label_buckets`` tokens, capped at
    ``max_label_tokens``); beyond the last bucket, when no maximum is set, multiples of it. With both maxima set, a
    run (training and ``epoch()``) therefore has at most ``len(audio_buckets) x len(label_buckets)`` batch shapes, in
    practice fewer since audio and text lengths go together (``batch_shapes`` lists an epoch's before it runs).

    Labels are the tokenizer's ids of the text, padded with -100; the first column is dropped when every row of the
    global batch starts with ``decoder_start_token_id`` (transformers' ``DataCollatorSpeechSeq2SeqWithPadding``).
    ``max_label_tokens`` counts a row's ids without that first token; so in a global batch where only some rows
    start with it (nothing stripped, as in transformers) those rows are one token longer, which can take T one
    bucket further (to 2 x ``max_label_tokens`` at most). BERT / BART style tokenizers start every row alike.
    Audio is featurised one row at a time, then padded with the extractor's ``padding_value`` (mask 0), as
    transformers' ``feature_extractor.pad`` does.

    Rows past the data (the last, partial batch when ``drop_remainder=False`` and in ``epoch()``) and rows whose audio
    fails to decode although its header read fine are padding rows: zero mask, labels all -100 (no loss, no
    gradient), id None.

    ``cache_gb`` > 0 keeps each row's features in memory, as long as the total stays within that many GiB, so
    that later epochs neither read nor featurise its audio again (features depend on the row alone, so batches are
    the same with or without the cache).

    ``shuffle=True``: each epoch length-grouped and shuffled from ``(seed, epoch)``; ``shuffle=False``: manifest order.
    With ``drop_remainder`` an epoch leaves out ``usable_rows % batch_size`` rows (a different set each epoch).
    ``skipped`` counts rows left out by reason (``REASONS``): the scan's, the same in every process, plus this
    process's decode failures ("unreadable") as batches are yielded.
    """

    skipped: dict[str, int]

    def __init__(self, examples: Sequence[Example], processor: "Processor", *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, max_audio_seconds: float | None = None, min_audio_seconds: float = 0.0,
                 max_label_tokens: int | None = None, audio_buckets: Sequence[float] = DEFAULT_BUCKET_SECONDS,
                 label_buckets: Sequence[int] = DEFAULT_LABEL_BUCKETS, num_workers: int = 4,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool = True, on_bad: str = "skip",
                 decoder_start_token_id: int | None = None, mega_batch_mult: int | None = None, prefetch: int = 2,
                 cache_gb: float = 0.0):
        self.examples = list(examples)
        self.processor = processor
        self.batch_size = check_number(batch_size, "Loader: batch_size")
        self.process_count = check_number(process_count, "Loader: process_count")
        self.process_index = check_number(process_index, "Loader: process_index", low=0, high=process_count - 1)
        if self.batch_size % self.process_count:
            raise ConfigError(f"Loader: batch_size {batch_size} is not divisible by process_count {process_count}")
        self.local_batch_size = self.batch_size // self.process_count
        self.seed = check_number(seed, "Loader: seed", low=None)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.on_bad = check_on_bad(on_bad)
        self.num_workers = check_number(num_workers, "Loader: num_workers", low=0)
        self.prefetch = check_number(prefetch, "Loader: prefetch", low=0)
        self.mega_batch_mult = check_number(mega_batch_mult, "Loader: mega_batch_mult", optional=True)
        self.decoder_start_token_id = check_number(decoder_start_token_id, "Loader: decoder_start_token_id", low=0,
                                                   optional=True)
        if getattr(processor, "tokenizer", None) is None:
            raise ConfigError("Loader: the processor has no tokenizer; training labels need one")
        self.rate = int(processor.feature_extractor.sampling_rate)
        self.max_samples = _cap(max_audio_seconds, "max_audio_seconds", self.rate)
        self.min_samples = math.ceil(check_number(min_audio_seconds, "Loader: min_audio_seconds", integer=False,
                                                  low=0) * self.rate)
        self.max_label_tokens = check_number(max_label_tokens, "Loader: max_label_tokens", optional=True)
        self.audio_buckets = _buckets([round(s * self.rate) for s in _seconds(audio_buckets)], self.max_samples,
                                      "audio_buckets")
        self.label_buckets = _buckets(list(label_buckets), self.max_label_tokens, "label_buckets")

        self.skipped = dict.fromkeys(REASONS, 0)
        usable, samples, tokens, starts = self._scan()
        if not usable:
            raise InputError(f"no usable rows among {len(self.examples)} (skipped: {self._skip_summary()})")
        self._rows = np.asarray(usable, dtype=np.int64)  # usable rows, as indices into examples
        self._samples = np.asarray(samples, dtype=np.int64)
        self._tokens = np.asarray(tokens, dtype=np.int64)  # full tokenizer length, before any stripping
        self._starts = np.asarray(starts, dtype=bool)  # the ids start with decoder_start_token_id
        self.fingerprint = self._fingerprint()
        self._epoch, self._batch, self._load_skipped = 0, 0, 0
        self._probes: dict[int, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
        # each row's features, unpadded, as the processor made them (they depend on the row alone), kept while
        # they fit in cache_gb: later epochs then neither read nor featurise the audio
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._cache_left = int(check_number(cache_gb, "Loader: cache_gb", integer=False, low=0) * 2**30)
        self._cache_lock = threading.Lock()
        self._loading: dict[int, threading.Event] = {}  # rows a worker is loading into the cache now

    # ------------------------------------------------------------------------------------------------ public
    @property
    def usable_rows(self) -> int:
        """Rows that passed the scan."""
        return len(self._rows)

    @property
    def batches_per_epoch(self) -> int:
        """Batches ``__iter__`` yields per epoch (every epoch has the same number)."""
        n, b = len(self._rows), self.batch_size
        return n // b if self.drop_remainder else -(-n // b)

    def __iter__(self) -> Iterator[dict]:
        """Training batches, endless: epoch after epoch from the current state (``set_state``); each yielded batch
        advances ``get_state()`` to the one after it."""
        if self.batches_per_epoch == 0:
            raise InputError(f"only {len(self._rows)} usable rows, fewer than batch_size {self.batch_size} with "
                             f"drop_remainder (skipped: {self._skip_summary()})")
        return self._run(self._training_specs(self._epoch, self._batch), track=True)

    def epoch(self) -> Iterator[dict]:
        """One pass over every usable row for evaluation: longest first, seed-independent, the last batch padded
        with padding rows; leaves the training state alone."""
        return self._run((self._spec(0, k, b) for k, b in enumerate(self._evaluation_plan())), track=False)

    def get_state(self) -> dict:
        """JSON-able position of the training iterator: the next batch ``__iter__`` yields is batch ``batch`` of
        epoch ``epoch``."""
        epoch, batch = self._epoch, self._batch
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": epoch, "batch": batch,
                "fingerprint": self.fingerprint, "load_skipped": self._load_skipped}

    def set_state(self, state: dict) -> None:
        """Continue from ``state`` (from ``get_state``, possibly through JSON) at the next ``iter()``: the same
        batches the saved iterator would have yielded next, whatever the worker or process count. The saved seed
        wins over this loader's. Refuses, in one line, a state from other rows or other batching settings."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InputError(f"data state: expected a dict with version {STATE_VERSION} from Loader.get_state, "
                             f"got {str(state)[:80]}")
        for key in ("seed", "epoch", "batch", "load_skipped"):
            check_number(state.get(key), f"data state: field {key!r}", low=None if key == "seed" else 0)
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(f"data state: saved for other data or batching settings (fingerprint "
                             f"{state.get('fingerprint')!r}, this loader's is {self.fingerprint!r}); resuming would "
                             "not continue the same batches")
        self.seed, self._epoch, self._batch = int(state["seed"]), int(state["epoch"]), int(state["batch"])
        self.skipped["unreadable"] += int(state["load_skipped"]) - self._load_skipped
        self._load_skipped = int(state["load_skipped"])

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches of training epoch ``epoch`` as example indices (before sharding)."""
        return [self._rows[b] for b in self._plan(epoch)]

    def batch_shapes(self, epoch: int | None = 0) -> list[tuple[int, int, int]]:
        """The distinct (B, N samples, T tokens) padded shapes of training epoch ``epoch``, or of ``epoch()`` when
        None, from the scan alone (no audio is read)."""
        order = self._plan(epoch) if epoch is not None else self._evaluation_plan()
        return sorted({(self.local_batch_size, s.samples, s.tokens) for s in (self._spec(0, 0, b) for b in order)})

    # ------------------------------------------------------------------------------------------------ scan
    def _scan(self) -> tuple[list[int], list[int], list[int], list[bool]]:
        """Check every row (text, audio header, label length) in manifest order."""
        def audio_length(ex: Example) -> tuple[int, str | None, str | None]:
            if ex.problem is not None:
                return -1, "malformed", ex.problem
            if not ex.text.strip():
                return -1, "empty_text", "empty text"
            return _header_samples(ex.audio, self.rate)

        if self.num_workers > 0:
            with ThreadPoolExecutor(self.num_workers) as pool:
                found = list(pool.map(audio_length, self.examples, chunksize=64))
        else:
            found = [audio_length(ex) for ex in self.examples]

        usable, samples, tokens, starts = [], [], [], []
        start = self.decoder_start_token_id
        for i, (ex, (n, reason, message)) in enumerate(zip(self.examples, found)):
            if reason is None:
                if n > (self.max_samples or n):
                    reason, message = "audio_too_long", (f"audio is {n / self.rate:.2f} s, longer than "
                                                         f"max_audio_seconds {self.max_samples / self.rate:g}")
                elif n < self.min_samples:
                    reason, message = "audio_too_short", (f"audio is {n / self.rate:.3f} s, shorter than "
                                                          f"min_audio_seconds {self.min_samples / self.rate:g}")
            if reason is None:  # tokenised here, in one thread: tokenizers are not shared between threads
                ids = self.processor.tokenizer.encode(ex.text)
                begins = bool(ids) and start is not None and ids[0] == start
                if len(ids) - begins > (self.max_label_tokens or math.inf):
                    reason, message = "labels_too_long", (f"text is {len(ids) - begins} tokens, more than "
                                                          f"max_label_tokens {self.max_label_tokens}")
            if reason is not None:
                if self.on_bad == "raise":
                    raise InputError(f"{ex.where or ex.id}: {message}")
                self.skipped[reason] += 1
                continue
            usable.append(i)
            samples.append(n)
            tokens.append(len(ids))
            starts.append(begins)
        return usable, samples, tokens, starts

    def _fingerprint(self) -> str:
        """A hash of everything the batch plan depends on except seed, epoch and process layout. Not the audio
        paths: a data set moved to another folder or host resumes."""
        h = hashlib.sha256(json.dumps([self.batch_size, self.shuffle, self.drop_remainder, self.mega_batch_mult,
                                       self.decoder_start_token_id, self.rate, self.audio_buckets,
                                       self.label_buckets]).encode())
        for i, n, t, s in zip(self._rows.tolist(), self._samples.tolist(), self._tokens.tolist(), self._starts):
            ex = self.examples[i]
            h.update(f"{ex.id}\0{ex.text}\0{n}\0{t}\0{int(s)}\n".encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:16]

    def _skip_summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "none"

    # ------------------------------------------------------------------------------------------------ batches
    def _plan(self, epoch: int) -> list[np.ndarray]:
        """Training epoch ``epoch``'s global batches as positions into the usable rows."""
        if self.shuffle:
            return length_grouped_batches(self._samples, self.batch_size, self.seed, epoch, self.mega_batch_mult,
                                          self.drop_remainder)
        return sequential_batches(len(self._rows), self.batch_size, self.drop_remainder)

    def _evaluation_plan(self) -> list[np.ndarray]:
        return [np.asarray(b) for b in batches_by_length(self._samples.tolist(), self.batch_size)]

    def _training_specs(self, epoch: int, start: int) -> Iterator[_Spec]:
        while True:
            for k, batch in enumerate(self._plan(epoch)):
                if k >= start:
                    yield self._spec(epoch, k, batch)
            epoch, start = epoch + 1, 0

    def _spec(self, epoch: int, index: int, batch: np.ndarray) -> _Spec:
        """The batch of usable-row positions ``batch`` (a global batch, at most batch_size rows) as this process's
        rows and the global padded shape."""
        strip = self.decoder_start_token_id is not None and bool(self._starts[batch].all())
        samples = bucket_length(int(self._samples[batch].max()), self.audio_buckets)
        tokens = bucket_length(max(1, int((self._tokens[batch] - strip).max())), self.label_buckets)
        rows = [int(self._rows[i]) for i in batch]
        rows += [None] * (self.batch_size - len(rows))
        b = self.local_batch_size
        return _Spec(epoch, index, tuple(rows[self.process_index * b:(self.process_index + 1) * b]), samples,
                     tokens, strip)

    def _run(self, specs: Iterator[_Spec], track: bool) -> Iterator[dict]:
        """Build the batches of ``specs`` in order, the rows of the next ``prefetch`` batches loading in worker
        threads meanwhile. With ``track``, each yielded batch moves the training state past it."""
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="speechseq-data") if self.num_workers else None
        pending: deque[tuple[_Spec, list[Callable[[], Any]]]] = deque()

        def submit(spec: _Spec) -> None:
            jobs = []
            for row in spec.rows:
                if row is None:
                    jobs.append(lambda: None)
                elif pool is None:
                    jobs.append(lambda row=row: self._featurise(row, spec.samples))
                else:
                    jobs.append(pool.submit(self._featurise, row, spec.samples).result)
            pending.append((spec, jobs))

        try:
            for spec in specs:
                submit(spec)
                while len(pending) > (self.prefetch if pool else 0):
                    batch_spec, jobs = pending.popleft()
                    batch = self._assemble(batch_spec, [job() for job in jobs])
                    if track:
                        self._epoch, self._batch = batch_spec.epoch, batch_spec.index + 1
                    yield batch
            while pending:
                batch_spec, jobs = pending.popleft()
                batch = self._assemble(batch_spec, [job() for job in jobs])
                if track:
                    self._epoch, self._batch = batch_spec.epoch, batch_spec.index + 1
                yield batch
        finally:  # (a generator dropped at interpreter exit finds the thread pool's modules already torn down)
            if pool is not None and not sys.is_finalizing():
                pool.shutdown(wait=False, cancel_futures=True)

    def _probe(self, samples: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape (without the batch axis) and dtype of each feature for audio padded to ``samples``: the
        features of that many zero samples (works for any feature extractor, waveform or filterbank)."""
        if samples not in self._probes:
            with np.errstate(divide="ignore", invalid="ignore"):  # silence has no variance for CMVN: shapes only
                feats = self.processor(audio=[np.zeros(samples, np.float32)], sampling_rate=self.rate)
            self._probes[samples] = {k: (np.asarray(v).shape[1:], np.asarray(v).dtype) for k, v in feats.items()}
        return self._probes[samples]

    def _featurise(self, row: int, samples: int) -> dict[str, np.ndarray] | str:
        """Row ``row``'s features padded to the batch's audio bucket [1, ...], or why its audio failed."""
        feats = self._cached(row)
        if feats is None:
            try:
                feats = self._load(row, samples)
            finally:
                self._done(row)
            if isinstance(feats, str):
                return feats
        probe = self._probe(samples)
        out = {}
        for key, value in feats.items():
            (length, *_), dtype = probe[key]
            pad = [(0, 0)] * value.ndim
            pad[1] = (0, length - value.shape[1])
            out[key] = np.pad(value.astype(dtype, copy=False), pad, constant_values=self._pad_value(key))
        return out

    def _load(self, row: int, samples: int) -> dict[str, np.ndarray] | str:
        """Row ``row``'s features (unpadded), kept in the cache while it has room, or why its audio failed."""
        ex = self.examples[row]
        try:
            audio = load_audio(ex.audio, self.rate)
            if audio.shape[0] > samples:
                return (f"{ex.audio}: {audio.shape[0]} samples at {self.rate} Hz, more than the file's header "
                        f"promised ({samples} at most)")
            feats = {k: np.asarray(v) for k, v in self.processor(audio=[audio], sampling_rate=self.rate).items()}
        except InputError as e:
            return str(e)
        size = sum(v.nbytes for v in feats.values())
        with self._cache_lock:
            if size <= self._cache_left and row not in self._cache:
                self._cache[row] = feats
                self._cache_left -= size
        return feats

    def _cached(self, row: int) -> dict[str, np.ndarray] | None:
        """The cached features of ``row``, or None when this thread is to load them. With a cache, a row that
        another worker is loading (it can sit in the last batch of one epoch and the first of the next, both in
        flight) is waited for rather than read twice."""
        if not self._cache_left and not self._cache:
            return None
        while True:
            with self._cache_lock:
                if row in self._cache:
                    return self._cache[row]
                loading = self._loading.get(row)
                if loading is None:
                    self._loading[row] = threading.Event()
                    return None
            loading.wait()  # then the row is cached, or it did not fit (or failed) and this thread loads it

    def _done(self, row: int) -> None:
        with self._cache_lock:
            event = self._loading.pop(row, None)
        if event is not None:
            event.set()

    def _pad_value(self, key: str) -> float:
        return 0 if key == "attention_mask" else getattr(self.processor.feature_extractor, "padding_value", 0.0)

    def _assemble(self, spec: _Spec, results: list[dict[str, np.ndarray] | str | None]) -> dict:
        ids: list[str | None] = []
        texts: dict[int, str] = {}
        rows = []
        for position, (row, result) in enumerate(zip(spec.rows, results)):
            if isinstance(result, str):  # the header read fine but the audio did not decode
                ex = self.examples[row]
                if self.on_bad == "raise":
                    raise InputError(f"{ex.where or ex.id}: {result}")
                self.skipped["unreadable"] += 1
                self._load_skipped += 1
                result = None
            rows.append(result)
            ids.append(None if result is None else self.examples[row].id)
            if result is not None:
                texts[position] = self.examples[row].text
        probe = self._probe(spec.samples)
        batch: dict[str, Any] = {
            key: np.concatenate([r[key] if r is not None else np.full((1, *shape), self._pad_value(key), dtype)
                                 for r in rows])
            for key, (shape, dtype) in probe.items()}
        labels = np.full((len(rows), spec.tokens), -100, dtype=np.int32)
        if texts:
            strip = self.decoder_start_token_id if spec.strip else None
            labels[list(texts)] = self.processor.tokenizer.encode_labels(list(texts.values()), pad_to=spec.tokens,
                                                                         strip_start_id=strip)
        batch["labels"] = labels
        batch["ids"] = ids
        return batch


def _header_samples(audio: str, rate: int) -> tuple[int, str | None, str | None]:
    """(length at ``rate`` Hz, None, None) from an audio file's header, or (-1, reason, message)."""
    import soundfile as sf

    if not Path(audio).is_file():
        return -1, "missing_file", f"audio file not found: {audio}"
    try:
        info = sf.info(audio)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        return -1, "unreadable", f"{audio}: cannot read as audio ({first_line(e)})"
    if info.frames <= 0 or info.samplerate <= 0:
        return -1, "unreadable", f"{audio}: contains no audio samples"
    # soxr's output length: n * rate / file rate, rounded half up (load_audio resamples with soxr)
    return (2 * info.frames * rate + info.samplerate) // (2 * info.samplerate), None, None


def _seconds(values: Sequence[float]) -> list[float]:
    if not values:
        raise ConfigError("Loader: audio_buckets should list at least one length in seconds")
    return [check_number(v, "Loader: audio_buckets entry", integer=False, low=0, above=True) for v in values]


def _cap(seconds: float | None, name: str, rate: int) -> int | None:
    if seconds is None:
        return None
    return int(check_number(seconds, f"Loader: {name}", integer=False, low=0, above=True) * rate)


def _buckets(values: list[int], cap: int | None, name: str) -> list[int]:
    """Sorted positive bucket lengths, those at or past ``cap`` replaced by ``cap`` itself."""
    if not values:
        raise ConfigError(f"Loader: {name} should list at least one length")
    values = sorted({check_number(v, f"Loader: {name} entry") for v in values})
    return values if cap is None else [v for v in values if v < cap] + [cap]
