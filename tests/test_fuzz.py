"""Fuzz tests (hypothesis) of what reads the files a user is handed: the checkpoint readers (safetensors, torch zip
``.bin``, sharded ``*.index.json``) and config parsing. For mutated and random inputs nothing may raise anything but
a ``speechseq.SpeechSeqError``, run past TIME_LIMIT_S, or allocate more than MEMORY_BASE + MEMORY_PER_BYTE x the
file's size (tracemalloc's peak per example, which numpy's arrays count in); no tensor may claim more bytes than the
file can hold. The suite runs a fixed, derandomized budget (~15 s on 2 cores); ``scripts/fuzz_readers.py --minutes
N`` runs the same properties (``TARGETS``) with fresh seeds for longer."""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import io
import json
import re
import shutil
import signal
import struct
import tempfile
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechseq.config import config_from_dict
from speechseq.errors import SpeechSeqError
from speechseq.checkpoints.readers import open_checkpoint, write_safetensors

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 10.0  # per example; a real one takes milliseconds
MEMORY_BASE = 64 << 20
MEMORY_PER_BYTE = 4
ZIP_MAX_RATIO = 8  # readers._ZIP_MAX_RATIO: what a zip member may expand to, relative to the file

WORKDIR = Path(tempfile.mkdtemp(prefix="speechseq-fuzz-"))
atexit.register(shutil.rmtree, WORKDIR, True)

# settings of every property here; the suite adds a fixed budget, scripts/fuzz_readers.py its own
BASE_SETTINGS = settings(deadline=None, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- the bounds


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so that no ``except Exception`` in the code under test can hide it."""


def _alarm(signum, frame):
    raise Hang(f"example ran over {TIME_LIMIT_S} s")


@contextlib.contextmanager
def bounded(size: int) -> Iterator[None]:
    """The body may raise SpeechSeqError (swallowed), nothing else; it must end within TIME_LIMIT_S and allocate at
    most MEMORY_BASE + MEMORY_PER_BYTE * size bytes at its peak."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    alarm = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    if alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    start = time.perf_counter()
    try:
        yield
    except SpeechSeqError as e:
        assert "\n" not in str(e), str(e)
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1] - base
        if not tracing:
            tracemalloc.stop()
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert peak <= MEMORY_BASE + MEMORY_PER_BYTE * size, f"peak {peak} bytes for a {size}-byte input"


def exercise(path: Path) -> None:
    """What ``inspect`` and a load do with a checkpoint: open it, list names, shapes and dtypes, read every tensor."""
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    with bounded(size), open_checkpoint(path) as ckpt:
        for name in ckpt:
            shape, dtype = ckpt.shape(name), ckpt.dtype(name)
            array = ckpt[name]
            assert array.shape == shape and array.dtype == dtype, name
            assert array.nbytes <= ZIP_MAX_RATIO * size, f"{name}: {array.nbytes} bytes from a {size}-byte file"


# --------------------------------------------------------------------------- inputs

EDGE_INTS = [0, 1, 2, 3, 4, 7, 8, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62,
             2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100, -1, -2, -2**31, -2**63]
json_scalars = (st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.sampled_from(EDGE_INTS)
                | st.floats() | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

# bytes worth inserting into a pickle: opcodes that build much, memo puts far out, deep tuples, foreign globals
PICKLE_TOKENS = [b"\x8f", b"(", b"t", b"\x85" * 200, b"}", b"]", b"s", b"u", b"a", b"e", b"R", b"b", b"Q", b"0",
                 b"r\xff\xff\xff\x7f", b"q\xff", b"h\x00", b"j\xff\xff\x00\x00", b"\x94", b"N", b"\x88",
                 b"J\xff\xff\xff\xff",
                 b"\x8a\x08" + b"\xff" * 8, b"\x8b\xff\xff\xff\x7f", b"X\xff\xff\xff\x7f", b"\x95" + b"\xff" * 8,
                 b"cos\nsystem\n", b"ctorch\nFloatStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n",
                 b"ccollections\nOrderedDict\n", b"\x93", b".", b"\x80\x05"]


def _apply(seed: bytes, edits: list[tuple]) -> bytes:
    data = bytearray(seed)
    for kind, where, what in edits:
        where = where % (len(data) + 1)
        if kind == "flip" and where < len(data):
            data[where] ^= what
        elif kind == "set":  # a little-endian number field of 1, 2, 4 or 8 bytes
            width, value = what
            data[where:where + width] = (value % 256**width).to_bytes(width, "little")
        elif kind == "cut":
            del data[where:]
        elif kind == "insert":
            data[where:where] = what
    return bytes(data)


def mutations(seed: bytes, fields: list[int] = (), tokens: list[bytes] = ()) -> st.SearchStrategy[bytes]:
    """``seed`` with 1-4 edits: flipped bytes, truncation, inserted bytes or ``tokens``, and little-endian numbers
    set to edge values, anywhere or at the offsets in ``fields`` (header numbers)."""
    where = st.integers(0, len(seed))
    if fields:
        where = where | st.sampled_from(list(fields))
    number = st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from(EDGE_INTS) | st.integers(0, 2**64 - 1))
    insert = st.binary(min_size=1, max_size=16) | (st.sampled_from(list(tokens)) if tokens else st.nothing())
    edit = (st.tuples(st.just("flip"), where, st.integers(1, 255)) | st.tuples(st.just("set"), where, number)
            | st.tuples(st.just("cut"), where, st.none()) | st.tuples(st.just("insert"), where, insert))
    return st.lists(edit, min_size=1, max_size=4).map(functools.partial(_apply, seed))


@functools.cache
def seed_safetensors() -> bytes:
    path = WORKDIR / "seed.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16),
                             "c": np.array(7, np.int64), "e": np.zeros((0, 3), np.float16)})
    return path.read_bytes()


@functools.cache
def seed_bin(compression: int = zipfile.ZIP_STORED) -> bytes:
    """A torch.save checkpoint: a tensor, a transposed view of its storage, bf16, a scalar, an empty tensor."""
    import torch

    a = torch.arange(6.0).reshape(2, 3)
    buf = io.BytesIO()
    torch.save({"a": a, "t": a.t(), "b": torch.ones(4, dtype=torch.bfloat16), "c": torch.tensor(7),
                "e": torch.zeros(0, 3)}, buf)
    if compression == zipfile.ZIP_STORED:
        return buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(out, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return out.getvalue()


def zip_fields(data: bytes) -> list[int]:
    """Offsets of the size, offset, method, flag and length fields of every zip header in ``data``."""
    fields = []
    for sig, offsets in ((b"PK\x03\x04", (6, 8, 14, 18, 22, 26, 28)),
                         (b"PK\x01\x02", (8, 10, 16, 20, 24, 28, 30, 32, 42)),
                         (b"PK\x05\x06", (8, 10, 12, 16, 20)),
                         (b"PK\x06\x06", (24, 32, 40, 48)), (b"PK\x06\x07", (8,))):
        for m in re.finditer(re.escape(sig), data):
            fields += [m.start() + o for o in offsets]
    return fields


def json_numbers(data: bytes) -> list[int]:
    """Offsets of the numbers in a safetensors header (after the 8-byte length)."""
    (n,) = struct.unpack("<Q", data[:8])
    return [8 + m.start() for m in re.finditer(rb"\d+", data[8:8 + n])]


def _rezip(pkl: bytes, compression: int) -> bytes:
    """seed_bin() with data.pkl replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seed_bin())) as zin, zipfile.ZipFile(out, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, pkl if info.filename.endswith("/data.pkl") else zin.read(info))
    return out.getvalue()


@functools.cache
def seed_pickle() -> bytes:
    with zipfile.ZipFile(io.BytesIO(seed_bin())) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


@st.composite
def generated_safetensors(draw) -> bytes:
    """A header made up entry by entry: mostly honest offsets for drawn dtypes and shapes, then perturbed."""
    tags = ["F64", "F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "U8", "BOOL", "F33", "", "f32"]
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        tag = draw(st.sampled_from(tags))
        shape = draw(st.lists(st.integers(0, 4) | st.sampled_from(EDGE_INTS), max_size=4))
        size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}.get(tag, 1)
        n = int(np.prod([max(d, 0) for d in shape], dtype=object)) * size
        n = n if n <= 4096 else draw(st.integers(0, 64))
        offsets = draw(st.just([offset, offset + n]) | st.lists(st.sampled_from(EDGE_INTS) | st.integers(0, 64),
                                                                min_size=0, max_size=3))
        entry = {"dtype": tag, "shape": shape, "data_offsets": offsets}
        header[draw(st.text(max_size=6) | st.just(f"t{i}"))] = draw(st.just(entry) | json_values)
        offset += n
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.just({"format": "pt"}) | json_values)
    blob = json.dumps(header).encode()
    if draw(st.booleans()):  # nested deeply: json recurses per level
        depth = draw(st.sampled_from([100, 1000, 10**5]))
        blob = b'{"x":' + b"[" * depth + b"]" * depth + b"}"
    length = draw(st.just(len(blob)) | st.sampled_from(EDGE_INTS) | st.integers(0, len(blob) + 16))
    data = bytes(max(0, offset + draw(st.integers(-8, 8))))
    return struct.pack("<Q", length % 2**64) + blob + data


def safetensors_inputs() -> st.SearchStrategy[bytes]:
    seed = seed_safetensors()
    return mutations(seed, json_numbers(seed)) | generated_safetensors()


def bin_inputs() -> st.SearchStrategy[bytes]:
    """Mutations of a torch.save zip (stored, and re-zipped deflated) and of its data.pkl, re-zipped."""
    stored, deflated = seed_bin(), seed_bin(zipfile.ZIP_DEFLATED)
    pickles = st.tuples(mutations(seed_pickle(), tokens=PICKLE_TOKENS),
                        st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    plain = mutations(seed_pickle(), tokens=PICKLE_TOKENS)  # a plain pickle, not a zip
    return (mutations(stored, zip_fields(stored)) | mutations(deflated, zip_fields(deflated))
            | pickles.map(lambda p: _rezip(*p)) | plain)


SHARDS = ["s1.safetensors", "s2.bin"]
SHARD_NAMES = SHARDS + ["missing.safetensors", "", ".", "..", "../s1.safetensors", "/etc/passwd", "a\0b", "x" * 300,
                        "sub", "model.safetensors.index.json"]
TENSOR_NAMES = ["a", "b", "c", "e", "t", "zz"]


@st.composite
def index_inputs(draw) -> bytes:
    names = st.sampled_from(TENSOR_NAMES) | st.text(max_size=4)
    weight_map = draw(st.dictionaries(names, st.sampled_from(SHARD_NAMES), max_size=6)  # mostly shard names
                      | st.dictionaries(names, st.sampled_from(SHARD_NAMES) | st.text(max_size=6) | json_values,
                                        max_size=6))
    doc = draw(st.just({"metadata": {"total_size": 1}, "weight_map": weight_map}) | json_values
               | st.builds(lambda v: {"weight_map": v}, json_values))
    text = json.dumps(doc).encode()
    return draw(st.just(text) | mutations(text))


def _index_dir() -> Path:
    folder = WORKDIR / "index"
    if not folder.exists():
        (folder / "sub").mkdir(parents=True)
        (folder / "s1.safetensors").write_bytes(seed_safetensors())
        (folder / "s2.bin").write_bytes(seed_bin())
    return folder


MODEL_TYPES = ["wav2vec2", "hubert", "bert", "roberta", "gpt2", "bart", "mbart", "speech-encoder-decoder", "t5", ""]
CONFIG_KEYS = ["model_type", "encoder", "decoder", "hidden_size", "num_attention_heads", "num_hidden_layers",
               "intermediate_size", "conv_dim", "conv_kernel", "conv_stride", "vocab_size", "n_embd", "n_head",
               "n_layer", "d_model", "eos_token_id", "pad_token_id", "decoder_start_token_id", "hidden_act",
               "layer_norm_eps", "max_position_embeddings", "add_adapter", "num_adapter_layers",
               "num_conv_pos_embedding_groups", "tie_word_embeddings"]


@functools.cache
def base_configs() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((REPO / "configs").glob("*.json"))]


@st.composite
def config_inputs(draw) -> dict:
    """A config from configs/ with 1-4 fields of the top level, encoder or decoder set to random JSON or deleted."""
    cfg = copy.deepcopy(draw(st.sampled_from(base_configs())))
    for _ in range(draw(st.integers(1, 4))):
        parts = [cfg] + [cfg[k] for k in ("encoder", "decoder") if isinstance(cfg.get(k), dict)]
        part = draw(st.sampled_from(parts))
        key = draw(st.sampled_from(CONFIG_KEYS + sorted(part)) | st.text(max_size=6))
        if draw(st.integers(0, 4)) == 0:
            part.pop(key, None)
        else:
            part[key] = draw(json_values | st.sampled_from(MODEL_TYPES) | st.sampled_from(EDGE_INTS))
    return cfg


# --------------------------------------------------------------------------- the properties


def check_safetensors(data: bytes) -> None:
    folder = WORKDIR / "st"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    exercise(folder / "model.safetensors")


def check_bin(data: bytes) -> None:
    folder = WORKDIR / "bin"
    folder.mkdir(exist_ok=True)
    (folder / "pytorch_model.bin").write_bytes(data)
    exercise(folder / "pytorch_model.bin")


def check_index(text: bytes) -> None:
    index = _index_dir() / "model.safetensors.index.json"
    index.write_bytes(text)
    exercise(index)


def check_config(cfg: dict) -> None:
    with bounded(len(json.dumps(cfg))):
        hash(config_from_dict(cfg))  # a parsed config is a static jax.jit argument


# name -> (strategy, check); scripts/fuzz_readers.py runs these too
TARGETS = {
    "safetensors": (st.deferred(safetensors_inputs), check_safetensors),
    "bin": (st.deferred(bin_inputs), check_bin),
    "index": (index_inputs(), check_index),
    "config": (config_inputs(), check_config),
}
# examples per target in the suite: ~15 s in all on 2 cores (derandomized: the same inputs every run)
SUITE_EXAMPLES = {"safetensors": 500, "bin": 600, "index": 300, "config": 400}


def _suite_test(name: str):
    strategy, check = TARGETS[name]
    return settings(BASE_SETTINGS, max_examples=SUITE_EXAMPLES[name], derandomize=True)(given(strategy)(check))


test_fuzz_safetensors = _suite_test("safetensors")
test_fuzz_bin = _suite_test("bin")
test_fuzz_index = _suite_test("index")
test_fuzz_config = _suite_test("config")


def test_list_activation_is_a_config_error():
    """The one case fuzzing found in config parsing: a list as an activation name."""
    cfg = base_configs()[0]
    with pytest.raises(SpeechSeqError):
        config_from_dict({**cfg, "encoder": {**cfg["encoder"], "hidden_act": ["gelu"]}})


def test_bounds_catch_what_they_should():
    """The harness itself: other exceptions, over-allocation and hangs fail an example."""
    with bounded(0):
        raise SpeechSeqError("one line")
    for body, expected in ((lambda: 1 / 0, ZeroDivisionError), (lambda: bytearray(MEMORY_BASE + 1), AssertionError)):
        try:
            with bounded(0):
                body()
        except expected:
            pass
        else:
            raise AssertionError(f"{expected.__name__} not raised")
