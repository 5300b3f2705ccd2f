"""Torch-free reading and writing of Hugging Face PyTorch checkpoints.

Reads ``model.safetensors`` (own parser, lazy per-tensor reads), ``pytorch_model.bin``
(torch's zip format, through a restricted unpickler that only rebuilds tensor data) and
their sharded ``*.index.json`` variants. Writes safetensors files. Needs numpy and
ml_dtypes only; torch is never imported.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import reprlib
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from speechseq.errors import CheckpointError, first_line
from speechseq.checkpoints.storage import atomic_file

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "WEIGHT_FILE_NAMES",
    "open_checkpoint",
    "write_safetensors",
]

# Looked for, in this order, inside a checkpoint directory.
WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# safetensors dtype tag <-> numpy dtype (safetensors data is little-endian).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_ST_TAGS: dict[np.dtype, str] = {dt: tag for tag, dt in _ST_DTYPES.items()}

# Hostile files cost bounded work: nothing a file declares makes us read, decompress or build more than these allow.
# The safetensors library's own cap on the JSON header (so every file it opens opens here too).
_ST_HEADER_MAX = 100_000_000
# torch.save writes ~100 bytes of data.pkl per tensor: 16 MiB is ~160,000 tensors, more than any one file holds.
# Unpickling builds at most ~80 bytes of objects per pickle byte (empty dicts; see _PICKLE_OPCODES), so <= ~1.3 GB.
_PICKLE_MAX = 16 << 20
# torch.save stores zip members uncompressed; a re-zipped checkpoint of real weights shrinks by < 2x. Members that
# expand to more than 8x the file are a decompression bomb (deflate reaches ~1000x on zeros).
_ZIP_MAX_RATIO = 8
# *.index.json: ~100 bytes per tensor; 64 MiB is ~600,000 tensors. JSON parsing builds ~20x its input at worst.
_INDEX_MAX = 64 << 20
# numpy's limits on an array: 64 dimensions, fewer than 2**63 bytes (counting the nonzero dimensions of an empty one).
_MAX_NDIM = 64
_short = reprlib.Repr()  # bounded repr of hostile values for messages: depth and length capped, no recursion
_short.maxstring, _short.maxother, _short.maxlong = 200, 80, 60


def _dims(values: Any) -> bool:
    """A tuple or list of at most _MAX_NDIM non-negative ints below 2**63 (no bool, float or str)."""
    return (isinstance(values, (tuple, list)) and len(values) <= _MAX_NDIM
            and all(type(v) is int and 0 <= v < 1 << 63 for v in values))


def _valid_shape(shape: Any, itemsize: int) -> bool:
    """``shape`` is dimensions numpy can make an array of: below 2**63 bytes (the nonzero ones, if it is empty)."""
    return _dims(shape) and math.prod(d for d in shape if d) * itemsize < 1 << 63


def _error(path: Path | str, message: str) -> CheckpointError:
    """A one-line CheckpointError prefixed with the file name."""
    name = Path(path).name or str(path)
    return CheckpointError(" ".join(f"{name}: {message}".splitlines()))


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


class _SafetensorsFile:
    """One safetensors file: header parsed at open, tensors read on demand."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        size = path.stat().st_size
        f = open(path, "rb")
        try:
            self._entries, self.metadata, self._data_start = self._parse_header(f, size)
        except BaseException:
            f.close()
            raise
        self._file: io.BufferedReader | None = f

    def _parse_header(self, f: Any, size: int) -> tuple[dict, dict[str, str], int]:
        path = self.path
        raw = f.read(8)
        if len(raw) < 8:
            raise _error(path, f"file is too short for a safetensors header ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise _error(path, f"header length {n} is larger than the file ({size} bytes); "
                               "the file is truncated or not safetensors")
        if n > _ST_HEADER_MAX:
            raise _error(path, f"header length {n} is over the safetensors limit of {_ST_HEADER_MAX} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _error(path, f"safetensors header is not valid JSON ({first_line(e)})") from None
        except RecursionError:  # json's parser recurses once per nesting level
            raise _error(path, "safetensors header is nested too deeply to be a header") from None
        if not isinstance(header, dict):
            raise _error(path, "safetensors header must be a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _error(path, "safetensors __metadata__ must map str to str")
        data_size = size - 8 - n
        entries = {name: self._entry(name, info) for name, info in header.items()}
        # As the safetensors library checks: in offset order the tensors tile the data exactly, with no overlap
        # (two names for the same bytes), gap or tail, so no tensor reads bytes another one owns or the file lacks.
        end = 0
        for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
            if begin != end:
                raise _error(path, f"tensor {_short.repr(name)} data_offsets [{begin}, {stop}] "
                                   f"{'overlap' if begin < end else 'leave a gap after'} the data before them, "
                                   f"which ends at byte {end} (tensors must tile the data area)")
            end = stop
        if end > data_size:
            raise _error(path, f"file is truncated: header says {end} bytes of tensor "
                               f"data, found {data_size}")
        if end < data_size:
            raise _error(path, f"{data_size - end} bytes after the last tensor's data (header covers {end} of "
                               f"{data_size}); the file is corrupt")
        return entries, dict(metadata), 8 + n

    def _entry(self, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """One header entry, checked up front: a known dtype, a shape numpy can make and offsets that span exactly
        prod(shape) * itemsize bytes (so no count in the header can exceed the file's size)."""
        path, tag = self.path, info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(tag, str) or tag not in _ST_DTYPES:
            if isinstance(info, dict) and "dtype" in info:
                raise _error(path, f"tensor {_short.repr(name)} has unsupported dtype {_short.repr(tag)} "
                                   f"(supported: {', '.join(_ST_DTYPES)})")
            raise _error(path, f"tensor {_short.repr(name)} needs 'dtype', 'shape' and "
                               "'data_offsets' [begin, end] in the header")
        dtype, shape, offsets = _ST_DTYPES[tag], info.get("shape"), info.get("data_offsets")
        if not _valid_shape(shape, dtype.itemsize):
            raise _error(path, f"tensor {_short.repr(name)} has shape {_short.repr(shape)}; expected a list of "
                               f"at most {_MAX_NDIM} non-negative ints, under 2**63 bytes in all")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and o >= 0 for o in offsets)):
            raise _error(path, f"tensor {_short.repr(name)} data_offsets {_short.repr(offsets)} must be "
                               "[begin, end], two non-negative ints")
        begin, end = offsets
        need = math.prod(shape) * dtype.itemsize
        if end - begin != need:
            raise _error(path, f"tensor {_short.repr(name)} data_offsets [{begin}, {end}] do not fit "
                               f"shape {list(shape)} of {tag} ({need} bytes)")
        return dtype, tuple(shape), begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        out = np.empty(shape, dtype)
        buf = out.reshape(-1).view(np.uint8)
        with self._lock:
            if self._file is None:
                raise _error(self.path, "checkpoint is closed")
            self._file.seek(self._data_start + begin)
            got = self._file.readinto(buf) if end > begin else 0
        if got != end - begin:
            raise _error(self.path, f"file is truncated: tensor '{name}' needs {end - begin} "
                                    f"bytes, found {got}")
        return out

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` to a safetensors file atomically (temp file + ``os.replace``).

    ``metadata`` defaults to ``{"format": "pt"}``, which transformers requires.
    """
    path = Path(path)
    metadata = {"format": "pt"} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _error(path, "metadata must map str to str")
    arrays = {name: _writable(path, name, value) for name, value in tensors.items()}
    # Largest item size first, then by name: every tensor starts at an aligned offset.
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {"dtype": _ST_TAGS[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            if arrays[name].size:
                f.write(arrays[name].reshape(-1).view(np.uint8).data)

    with atomic_file(path, binary=True) as f:
        write(f)


def write_safetensors_streamed(
    path: str | os.PathLike,
    names: Sequence[str],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
    """``write_safetensors`` for tensors that arrive one at a time, so that only one is in memory: ``names`` (all of
    them, known up front) size a header area, each tensor's bytes are written as it comes, and the header (shapes,
    dtypes, offsets in arrival order) is written last into that area, padded with spaces as the format allows.
    Tensors of one item size keep every offset aligned, as ``write_safetensors`` does by sorting."""
    path = Path(path)
    metadata = {"format": "pt"} if metadata is None else metadata
    expected = set(names)
    # room for each entry: its name plus the longest dtype tag, shape (rank <= 8) and two offsets JSON can take
    reserve = len(json.dumps({"__metadata__": metadata})) + sum(len(json.dumps(n)) + 256 for n in names)
    reserve += -reserve % 8

    def write(f: Any) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        f.write(struct.pack("<Q", reserve))
        f.write(b" " * reserve)
        offset = 0
        for name, value in tensors:
            if name not in expected or name in header:
                raise _error(path, f"tensor {name!r} was not announced or came twice")
            arr = _writable(path, name, value)
            if arr.ndim > 8:
                raise _error(path, f"tensor '{name}' has {arr.ndim} dimensions; at most 8 fit the reserved header")
            header[name] = {"dtype": _ST_TAGS[arr.dtype], "shape": list(arr.shape),
                            "data_offsets": [offset, offset + arr.nbytes]}
            if arr.size:
                f.write(arr.reshape(-1).view(np.uint8).data)
            offset += arr.nbytes
        absent = expected - set(header)
        if absent:
            raise _error(path, f"{len(absent)} announced tensors never came (first: {sorted(absent)[0]})")
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        f.seek(8)
        f.write(blob + b" " * (reserve - len(blob)))

    with atomic_file(path, binary=True) as f:
        write(f)


def _writable(path: Path, name: Any, value: Any) -> np.ndarray:
    """A tensor as a little-endian C-contiguous array of a safetensors dtype (or a one-line error)."""
    if not isinstance(name, str) or name == "__metadata__":
        raise _error(path, f"invalid tensor name {name!r}")
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype not in _ST_TAGS:
        raise _error(path, f"cannot write tensor '{name}' of dtype {arr.dtype} (supported: {', '.join(_ST_DTYPES)})")
    return arr if arr.flags.c_contiguous else np.array(arr, order="C")


# ---------------------------------------------------------------------------
# pytorch_model.bin (torch zip format) without torch
# ---------------------------------------------------------------------------

_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype(np.bool_),
}
# torch dtype globals that appear in `_rebuild_tensor_v3` (newer dtypes, untyped storages).
_TORCH_DTYPES = {
    "float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype("<i8"), "int32": np.dtype("<i4"), "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"), "uint64": np.dtype("<u8"), "uint32": np.dtype("<u4"),
    "uint16": np.dtype("<u2"), "uint8": np.dtype("u1"), "bool": np.dtype(np.bool_),
}


class _StorageType:
    """Stand-in for a torch storage class: only carries the element dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _DType:
    """Stand-in for a torch dtype global."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _TensorType:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` (used by _rebuild_from_type_v2)."""

    __slots__ = ()


class _Storage:
    """A storage record ``data/<key>`` of the archive, not read yet."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """A tensor as a strided view into a storage, not read yet."""

    __slots__ = ("storage", "dtype", "offset", "shape", "stride")

    def __init__(self, storage: Any, offset: Any, shape: Any, stride: Any,
                 dtype: np.dtype | None = None) -> None:
        if not isinstance(storage, _Storage):
            raise TypeError("tensor storage is not a storage record")
        self.storage = storage
        self.dtype = storage.dtype if dtype is None else dtype
        self.offset = offset  # checked by _check_flat, once the whole pickle is read
        self.shape = tuple(shape)
        self.stride = tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> _TensorRef:
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks,
                       dtype, metadata=None) -> _TensorRef:
    if not isinstance(dtype, _DType):
        raise TypeError("_rebuild_tensor_v3 needs a torch dtype")
    return _TensorRef(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *_unused) -> Any:
    return data


def _rebuild_from_type_v2(func, new_type, args, state) -> Any:
    if func not in _REBUILDERS or not isinstance(new_type, _TensorType):
        raise TypeError("_rebuild_from_type_v2 only rebuilds plain tensors")
    return func(*args)


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)

_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _TensorType(),
    "torch._tensor.Tensor": _TensorType(),
    "torch.nn.parameter.Parameter": _TensorType(),
    "torch.UntypedStorage": _StorageType(np.dtype("u1")),
    "torch.storage.UntypedStorage": _StorageType(np.dtype("u1")),
    **{f"torch.{name}": _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()},
    **{f"torch.{name}": _DType(dt) for name, dt in _TORCH_DTYPES.items()},
}


# The opcodes of torch.save's pickles (protocols 2-4): dicts, tuples, small ints, strings, globals, persistent ids,
# memo (and lists and floats, which state dicts' metadata may hold). The rest is refused before unpickling: nothing
# in a checkpoint needs it, and some let a few bytes build much: an empty set costs 232 bytes of memory per pickle
# byte (an empty dict, the most allowed here, 80), LONG4 ints too long to print in a message.
_PICKLE_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP GLOBAL STACK_GLOBAL BINPERSID REDUCE BUILD
    NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINFLOAT BINUNICODE SHORT_BINUNICODE SHORT_BINBYTES BINBYTES
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS EMPTY_DICT SETITEM SETITEMS
    BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET
""".split())


# Per allowed opcode: items it pops below the last mark (None: pops no mark, then how many it pops), items it pushes.
_OPCODE_STACK = {op.name: (op.stack_before.index(pickletools.markobject) if pickletools.markobject in op.stack_before
                           else None, len(op.stack_before), len(op.stack_after))
                 for op in pickletools.opcodes if op.name in _PICKLE_OPCODES}
# torch's pickles nest tuples 3 deep. Hashing a tuple recurses in C without a depth check: a 1 MB pickle of a
# tuple nested 10**6 deep used as a dict key crashes the interpreter (SIGSEGV).
_PICKLE_MAX_DEPTH = 100


def _check_pickle(path: Path, data: bytes) -> None:
    """Walk the first pickle in ``data`` without building anything, refusing opcodes outside _PICKLE_OPCODES, memo
    indices past the opcodes read so far (the C unpickler grows its memo table to the index: 10 bytes asking for
    index 2**26 cost 1 GB) and tuples nested over _PICKLE_MAX_DEPTH deep. It follows the stack as pickletools
    describes each opcode, keeping per item how deeply tuples nest in it (at most: an opcode's result counts as deep
    as its deepest input). Malformed data raises pickle.UnpicklingError."""
    stack: list[int] = []  # tuple depth of each stack item
    marks: list[int] = []  # stack heights at each MARK
    memo: dict[int, int] = {}
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data), 1):
            name = op.name
            if name not in _OPCODE_STACK:
                raise _error(path, f"refusing pickle opcode {name} (only tensor data is allowed)")
            under_mark, n_before, n_after = _OPCODE_STACK[name]
            if name == "MARK":
                marks.append(len(stack))
            elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if name != "MEMOIZE" and arg > count:  # picklers number memo entries 0, 1, 2, ...
                    raise _error(path, f"pickle memo index {arg} is out of order (corrupt or hostile pickle)")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif n_before == 0:  # pushes a constant, a global or a memo item (or nothing: PROTO, FRAME)
                stack += [memo.get(arg, 0) if name in ("BINGET", "LONG_BINGET") else 0] * n_after
            else:  # pops the items after the last mark and those under it (SETITEMS' dict), or a fixed count
                k = len(stack) - n_before if under_mark is None else marks.pop() - under_mark
                if k < 0:
                    raise pickle.UnpicklingError(f"{name} pops more than the stack holds")
                depth = max(stack[k:]) if k < len(stack) else 0
                del stack[k:]
                if name.startswith("TUPLE"):
                    depth += 1
                    if depth > _PICKLE_MAX_DEPTH:
                        raise _error(path, f"pickle nests tuples over {_PICKLE_MAX_DEPTH} deep (corrupt or hostile)")
                stack += [depth] * n_after
    except CheckpointError:
        raise
    except (ValueError, IndexError) as e:  # genops' message for truncated or unknown data; no item or mark to pop
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from None


def _unpickle(path: Path, data: bytes, storages: dict[str, int] | None) -> Any:
    """The first pickle in ``data`` through _check_pickle and the restricted unpickler."""
    _check_pickle(path, data)
    return _RestrictedUnpickler(data, path, storages).load()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the tensor-rebuilding globals above."""

    def __init__(self, data: bytes, path: Path, storages: dict[str, int] | None) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._storage_sizes = storages  # record key -> bytes available; None: no records
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key not in _ALLOWED_GLOBALS:
            if module == "torch" and (name.endswith("Storage") or name.startswith(
                    ("float", "int", "uint", "complex", "bool", "bfloat", "qint", "quint"))):
                raise _error(self._path, f"unsupported tensor dtype '{key}' (supported: "
                                         f"{', '.join(_TORCH_DTYPES)})")
            raise _error(self._path, f"refusing to unpickle global '{key}' "
                                     "(only tensor data is allowed)")
        return _ALLOWED_GLOBALS[key]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise _error(self._path, f"unsupported persistent id in data.pkl: {_short.repr(pid)}")
        _, stype, key, _location, numel = pid
        if key in self._storages:
            return self._storages[key]
        available = (self._storage_sizes or {}).get(key)
        if available is None:
            raise _error(self._path, f"archive has no data/{key} record (corrupt checkpoint)")
        if available < numel * stype.dtype.itemsize:
            raise _error(self._path, f"archive record data/{key} is truncated: needs "
                                     f"{numel * stype.dtype.itemsize} bytes, found {available}")
        self._storages[key] = _Storage(key, stype.dtype, numel)
        return self._storages[key]


def _check_flat(path: Path, obj: Any) -> dict[str, _TensorRef]:
    """The unpickled object must be a flat ``{name: tensor}`` mapping."""
    if not isinstance(obj, dict):
        raise _error(path, f"expected a mapping of tensor names to tensors, found "
                           f"{type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _error(path, f"expected str tensor names, found {_short.repr(key)}")
        if isinstance(value, dict):
            raise _error(path, f"expected a flat mapping of tensor names to tensors, but "
                               f"'{key}' holds a nested mapping (nested checkpoints such as "
                               "{'state_dict': ...} are not supported)")
        if not isinstance(value, _TensorRef):
            raise _error(path, f"expected a flat mapping of tensor names to tensors, but "
                               f"'{key}' holds a {type(value).__name__}")
        shape, stride, offset = value.shape, value.stride, value.offset
        if not (_valid_shape(shape, value.dtype.itemsize) and _dims(stride)
                and len(shape) == len(stride) and type(offset) is int and offset >= 0):
            raise _error(path, f"tensor {_short.repr(key)} has shape {_short.repr(shape)}, stride "
                               f"{_short.repr(stride)} and offset {_short.repr(offset)}; expected "
                               f"non-negative ints, at most {_MAX_NDIM} dimensions, under 2**63 bytes in all")
        # A view reads no more elements than its storage holds (stride 0 could repeat one element 2**62 times, and
        # inspect would count them), and stays inside it: reading a tensor costs at most its record in the file.
        numel = value.storage.numel * value.storage.dtype.itemsize // value.dtype.itemsize
        elements = math.prod(shape)
        end = offset + sum((d - 1) * s for d, s in zip(shape, stride))
        if elements and (elements > numel or end >= numel):
            raise _error(path, f"tensor {_short.repr(key)} (shape {list(shape)}, stride {list(stride)}, offset "
                               f"{offset}) lies outside its storage of {numel} elements")
    return obj


# What zipfile raises for a corrupt archive: also ValueError (a name that is not UTF-8), RuntimeError (encrypted),
# NotImplementedError (a RuntimeError: patched data), struct.error (short fields).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, struct.error)


class _TorchZipFile:
    """One ``torch.save`` zip archive: data.pkl unpickled at open, storages read on demand."""

    format = "pytorch"
    metadata: dict[str, str] = {}

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":
            self._reject_non_zip(magic)
        try:
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
        except _ZIP_ERRORS as e:
            raise _error(path, f"corrupt or truncated zip archive ({first_line(e)})") from None
        try:
            self._size = path.stat().st_size
            self._check_archive()
            self._entries = self._load_index()
        except BaseException:
            self.close()
            raise

    def _reject_non_zip(self, magic: bytes) -> None:
        path = self.path
        if magic[:1] == b"\x80":  # a pickle: legacy torch format, or a plain pickle
            try:
                with open(path, "rb") as f:  # the first pickle tells: legacy files start with a 15-byte one
                    first = _unpickle(path, f.read(1 << 20), None)
            except CheckpointError:
                raise
            except Exception:
                first = None
            if first == _LEGACY_TORCH_MAGIC:
                raise _error(path, "legacy (pre-1.6, non-zip) PyTorch format is not "
                                   "supported; re-save it with a recent torch or as safetensors")
            raise _error(path, "is a plain pickle, not a PyTorch zip checkpoint; re-save it "
                               "with a recent torch or as safetensors")
        raise _error(path, "not a PyTorch zip checkpoint (no zip signature); the file is "
                           "corrupt, or a legacy format: re-save it with a recent torch or as "
                           "safetensors")

    def _check_archive(self) -> None:
        """Hold the central directory to what the file can contain before anything is decompressed: each member
        lies inside the file, is stored or deflated (what zipfile reads without a password), and together they
        expand to at most _ZIP_MAX_RATIO times the file."""
        assert self._zip is not None
        path, size, total = self.path, self._size, 0
        for info in self._zip.infolist():
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x61:
                raise _error(path, f"zip member {_short.repr(info.filename)} is encrypted or compressed with "
                                   f"method {info.compress_type}; torch.save stores members uncompressed")
            if (info.header_offset + 30 + info.compress_size > size
                    or info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size):
                raise _error(path, f"corrupt or truncated zip archive (member {_short.repr(info.filename)} "
                                   f"claims {info.compress_size} bytes at offset {info.header_offset} of a "
                                   f"{size}-byte file)")
            total += info.file_size
        if total > _ZIP_MAX_RATIO * size:
            raise _error(path, f"zip members expand to {total} bytes, over {_ZIP_MAX_RATIO}x the {size}-byte "
                               "file (torch.save stores them uncompressed): refusing a decompression bomb")

    def _read_member(self, name: str, limit: int) -> bytes:
        """A small member whose declared size is at most ``limit``, read through zipfile's size- and CRC-checked
        stream, which stops at the declared size whatever the compressed data would expand to."""
        assert self._zip is not None
        info = self._zip.getinfo(name)
        if info.file_size > limit:
            raise _error(self.path, f"{name} is {info.file_size} bytes, over the limit of {limit}")
        try:
            with self._zip.open(info) as f:
                return f.read(info.file_size)
        except _ZIP_ERRORS as e:
            raise _error(self.path, f"corrupt zip archive ({first_line(e)})") from None

    def _load_index(self) -> dict[str, _TensorRef]:
        path, zf = self.path, self._zip
        assert zf is not None
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise _error(path, "zip archive has no <archive>/data.pkl record; not a "
                               "PyTorch checkpoint")
        self._prefix = pkls[0][: -len("data.pkl")]
        data_dir = self._prefix + "data/"
        sizes = {n[len(data_dir):]: zf.getinfo(n).file_size
                 for n in names if n.startswith(data_dir)}
        # data.pkl is never larger than the file holding it: each tensor's record costs more bytes of zip headers
        # and data than its ~100 bytes of pickle, compressed or not. That bounds what unpickling builds by the file.
        pkl = self._read_member(pkls[0], min(_PICKLE_MAX, self._size))
        byteorder = "little"
        if self._prefix + "byteorder" in names:
            raw = self._read_member(self._prefix + "byteorder", 16)
            byteorder = raw.decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise _error(path, f"byteorder record must be 'little' or 'big', found "
                               f"{byteorder!r:.20}")
        self._big_endian = byteorder == "big"
        try:
            obj = _unpickle(path, pkl, sizes)
        except CheckpointError:
            raise
        except Exception as e:
            raise _error(path, f"malformed data.pkl ({type(e).__name__}: {e})") from None
        return dict(_check_flat(path, obj))

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name].dtype

    def _storage_bytes(self, key: str) -> np.ndarray:
        """The raw bytes of ``data/<key>``: memory-mapped when stored uncompressed."""
        if self._zip is None:
            raise _error(self.path, "checkpoint is closed")
        info = self._zip.getinfo(f"{self._prefix}data/{key}")
        if info.file_size == 0:
            return np.empty(0, np.uint8)
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as f:
                    f.seek(info.header_offset)
                    local = f.read(30)
                if len(local) == 30 and local[:4] == b"PK\x03\x04":
                    n_name, n_extra = struct.unpack("<HH", local[26:30])
                    start = info.header_offset + 30 + n_name + n_extra
                    if start + info.file_size <= self.path.stat().st_size:
                        return np.memmap(self.path, np.uint8, "r", start, (info.file_size,))
                raise zipfile.BadZipFile(f"bad local header for data/{key}")
            return np.frombuffer(self._zip.read(info), np.uint8)  # its size: checked by _check_archive
        except _ZIP_ERRORS as e:
            raise _error(self.path, f"corrupt zip archive ({first_line(e)})") from None

    def read(self, name: str) -> np.ndarray:
        ref = self._entries[name]
        dtype = ref.dtype
        if 0 in ref.shape:
            return np.empty(ref.shape, dtype)
        raw = self._storage_bytes(ref.storage.key)
        flat = raw[: raw.size // dtype.itemsize * dtype.itemsize].view(dtype)
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.shape,
            strides=tuple(s * dtype.itemsize for s in ref.stride), writeable=False)
        out = np.array(view, order="C", copy=True)
        del view, flat, raw
        if self._big_endian and dtype.itemsize > 1:
            out = out.view(f"u{dtype.itemsize}").byteswap().view(dtype)
        return out

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


# ---------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------

_File = _SafetensorsFile | _TorchZipFile


class Checkpoint(Mapping[str, np.ndarray]):
    """Read-only ``{name: np.ndarray}`` view of a checkpoint; tensors are read on access.

    ``keys()``, ``shape(name)`` and ``dtype(name)`` never read tensor data, so a converter
    can stream tensor by tensor. Use as a context manager or call ``close()``.
    """

    def __init__(self, files: list[_File], owner: dict[str, _File]) -> None:
        self._files = files
        self._owner = owner
        self.files: list[Path] = [f.path for f in files]
        self.format: str = files[0].format if files else "safetensors"
        self.metadata: dict[str, str] = dict(files[0].metadata) if files else {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``, without reading its data."""
        return self._owner[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        """numpy / ml_dtypes dtype of tensor ``name``, without reading its data."""
        return self._owner[name].dtype(name)

    def close(self) -> None:
        """Release open file handles."""
        for f in self._files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.format}, {len(self)} tensors, files={[p.name for p in self.files]})"


def _open_file(path: Path) -> _File:
    """Open one weights file, choosing the reader from its magic bytes and suffix."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _error(path, f"cannot read file ({e.strerror})") from None
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if magic == b"PK\x03\x04" or magic[:1] == b"\x80" or path.suffix in (".bin", ".pt", ".pth"):
        return _TorchZipFile(path)
    return _SafetensorsFile(path)


def _open_index(index: Path) -> Checkpoint:
    """Open a sharded checkpoint from its ``*.index.json`` (``weight_map``: name -> shard)."""
    try:
        with open(index, "rb") as f:
            text = f.read(_INDEX_MAX + 1)
    except OSError as e:
        raise _error(index, f"cannot read file ({e.strerror})") from None
    if len(text) > _INDEX_MAX:
        raise _error(index, f"index is over {_INDEX_MAX} bytes (~100 bytes per tensor); not a weight index")
    try:
        weight_map = json.loads(text.decode("utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(index, f"index is not valid JSON ({first_line(e)})") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise _error(index, "index is nested too deeply to be a weight index") from None
    except (KeyError, TypeError):
        raise _error(index, "index has no 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise _error(index, "'weight_map' must map tensor names to shard file names")
    shard_names = list(dict.fromkeys(weight_map.values()))
    for shard in shard_names:
        if shard != Path(shard).name or shard in ("", ".", ".."):
            raise _error(index, f"shard {_short.repr(shard)} must be a plain file name")
        try:
            exists = (index.parent / shard).is_file()
        except OSError:  # a name too long for the file system
            exists = False
        if not exists:
            raise _error(index, f"shard {_short.repr(shard)} listed in weight_map does not exist in "
                                f"{index.parent}")
    files: dict[str, _File] = {}
    try:
        for shard in shard_names:
            files[shard] = _open_file(index.parent / shard)
        contents = {shard: set(f.names()) for shard, f in files.items()}  # not a list per tensor: O(n**2)
        owner: dict[str, _File] = {}
        for name, shard in weight_map.items():
            if name not in contents[shard]:
                raise _error(index, f"tensor {_short.repr(name)} is mapped to shard '{shard}', which "
                                    "does not contain it")
            owner[name] = files[shard]
    except BaseException:
        for f in files.values():
            f.close()
        raise
    return Checkpoint(list(files.values()), owner)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a Hugging Face checkpoint directory, a weights file, or a ``*.index.json``.

    In a directory, the first of ``WEIGHT_FILE_NAMES`` that exists is used.
    """
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return open_checkpoint(path / name)
        raise CheckpointError(f"{path}: no model weights found; looked for "
                              f"{', '.join(WEIGHT_FILE_NAMES)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.name.endswith(".json"):
        return _open_index(path)
    file = _open_file(path)
    return Checkpoint([file], {name: file for name in file.names()})
