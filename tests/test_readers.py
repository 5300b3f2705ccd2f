"""Tests for speechseq.checkpoints.readers: torch-free checkpoint reading and safetensors writing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from speechseq.errors import CheckpointError
from speechseq.checkpoints.readers import Checkpoint, open_checkpoint, write_safetensors, write_safetensors_streamed

REPO = Path(__file__).resolve().parents[1]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """torch -> numpy, bfloat16 through float32."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def assert_same(ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.keys()) == sorted(state)
    for name, t in state.items():
        arr = ckpt[name]
        assert ckpt.shape(name) == tuple(t.shape) == arr.shape, name
        assert ckpt.dtype(name) == arr.dtype, name
        assert arr.flags.c_contiguous, name
        if t.dtype == torch.bfloat16:
            assert arr.dtype == ml_dtypes.bfloat16, name
            arr = arr.astype(np.float32)
        assert arr.dtype == as_numpy(t).dtype, name
        assert np.array_equal(arr, as_numpy(t)), name


def digest(arrays) -> str:
    """sha256 over (name, raw C-order bytes) of each tensor, in sorted name order."""
    h = hashlib.sha256()
    for name, arr in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).tobytes())
    return h.hexdigest()


def torch_digest(state: dict[str, torch.Tensor]) -> str:
    return digest((k, t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                  for k, t in state.items())


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.arange(20, dtype=torch.int64)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "transposed": base.t(),  # non-contiguous view
        "slice_a": shared[2:8],  # two slices of one storage
        "slice_b": shared[10:20:3],
        "bf16_t": torch.randn(3, 5, generator=g).bfloat16().t(),
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def error_of(fn, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- .bin


def test_bin_all_dtypes_and_views(tmp_path):
    state = mixed_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.files == [tmp_path / "pytorch_model.bin"]
        assert ckpt.format == "pytorch"
        assert_same(ckpt, state)
        assert ckpt.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
    with open_checkpoint(tmp_path / "pytorch_model.bin") as ckpt:  # the file itself
        assert len(ckpt) == len(state) and "f32" in ckpt and "nope" not in ckpt
    with pytest.raises(CheckpointError, match="closed"):
        ckpt["f32"]


def test_bin_newer_dtypes_via_rebuild_tensor_v3(tmp_path):
    state = {"u16": torch.tensor([1, 65535], dtype=torch.uint16),
             "f8": torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn)}
    torch.save(state, tmp_path / "w.bin")
    ckpt = open_checkpoint(tmp_path / "w.bin")
    assert ckpt["u16"].dtype == np.uint16 and ckpt["u16"].tolist() == [1, 65535]
    assert ckpt["f8"].dtype == ml_dtypes.float8_e4m3fn
    assert ckpt["f8"].astype(np.float32).tolist() == [0.5, -2.0]


def test_bin_big_endian_byteorder(tmp_path):
    state = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int64),
             "c": torch.randn(5).bfloat16()}
    torch.save(state, tmp_path / "le.bin")
    zin = zipfile.ZipFile(tmp_path / "le.bin")
    # one storage per tensor, keyed "0", "1", ... in insertion order
    item_size = {str(i): t.element_size() for i, t in enumerate(state.values())}
    with zipfile.ZipFile(tmp_path / "be.bin", "w", zipfile.ZIP_DEFLATED) as zout:  # compressed
        for info in zin.infolist():
            data = zin.read(info)
            rel = info.filename.split("/", 1)[1]
            if rel == "byteorder":
                data = b"big"
            elif rel.startswith("data/"):
                size = item_size[rel[5:]]
                data = np.frombuffer(data, f"<u{size}").astype(f">u{size}").tobytes()
            zout.writestr(info.filename, data)
    assert_same(open_checkpoint(tmp_path / "be.bin"), state)


def test_bin_loads_without_torch(tmp_path):
    state = mixed_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('torch is importable')\n"
        "import hashlib, numpy as np\n"
        "from speechseq.checkpoints.readers import open_checkpoint\n"
        f"ckpt = open_checkpoint({str(tmp_path)!r})\n"
        "h = hashlib.sha256()\n"
        "for name in sorted(ckpt):\n"
        "    h.update(name.encode())\n"
        "    h.update(ckpt[name].reshape(-1).view(np.uint8).tobytes())\n"
        "print(h.hexdigest())\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == torch_digest(state)


def test_bin_nested_state_dict_rejected(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "nested.bin")
    msg = error_of(open_checkpoint, tmp_path / "nested.bin")
    assert msg.startswith("nested.bin: ") and "'state_dict'" in msg and "nested" in msg
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "extra.bin")
    assert "'epoch' holds a int" in error_of(open_checkpoint, tmp_path / "extra.bin")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_torch_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2)}, tmp_path / "good.bin")
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(tmp_path / "good.bin") as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"w": _Evil(marker)}, protocol=2)
            zout.writestr(info.filename, data)
    msg = error_of(open_checkpoint, tmp_path)
    assert msg.startswith("pytorch_model.bin: refusing to unpickle global '")
    assert "system" in msg and "only tensor data is allowed" in msg
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    msg = error_of(open_checkpoint, path)
    assert "refusing to unpickle global" in msg and "system" in msg
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    assert "plain pickle" in error_of(open_checkpoint, path)


def test_legacy_torch_format_rejected(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    msg = error_of(open_checkpoint, tmp_path)
    assert msg.startswith("pytorch_model.bin: legacy") and "safetensors" in msg


def test_corrupt_zip(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: central directory gone
    msg = error_of(open_checkpoint, tmp_path)
    assert msg.startswith("pytorch_model.bin: corrupt or truncated zip archive")
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    assert "corrupt or truncated zip" in error_of(open_checkpoint, path)
    path.write_bytes(b"garbage, not a checkpoint")
    assert "not a PyTorch zip checkpoint" in error_of(open_checkpoint, path)


# --------------------------------------------------------------------------- safetensors


def test_safetensors_from_torch(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in mixed_state().items()
             if k not in ("slice_a", "slice_b")}  # save_file refuses shared storage
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "safetensors" and ckpt.metadata == {"format": "pt"}
        assert_same(ckpt, state)


def test_write_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    arrays = {
        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "f32": rng.standard_normal((2, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "f64": rng.standard_normal(2),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i32": np.arange(5, dtype=np.int32),
        "u8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2)).astype(np.float32)),
        "big_endian": np.arange(4, dtype=">i4"),
    }
    path = tmp_path / "model.safetensors"
    write_safetensors(path, arrays)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    header = json.loads(path.read_bytes()[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt) == sorted(arrays)
        for name, arr in arrays.items():
            assert ckpt[name].dtype == arr.dtype.newbyteorder("<") and ckpt[name].shape == arr.shape
            assert np.array_equal(ckpt[name], arr), name
    loaded = load_file(path)
    assert loaded["bf16"].dtype == torch.bfloat16
    assert np.array_equal(loaded["bf16"].float().numpy(), arrays["bf16"].astype(np.float32))
    for name in arrays:
        if name != "bf16":
            assert np.array_equal(loaded[name].numpy(), arrays[name]), name
    write_safetensors(path, {"x": arrays["f32"]}, metadata={"format": "pt", "note": "hi"})
    assert open_checkpoint(path).metadata == {"format": "pt", "note": "hi"}


def test_write_safetensors_failure_leaves_nothing(tmp_path):
    path = tmp_path / "model.safetensors"
    msg = error_of(write_safetensors, path, {"ok": np.zeros(2), "c": np.zeros(2, np.complex64)})
    assert msg.startswith("model.safetensors: cannot write tensor 'c'")
    assert os.listdir(tmp_path) == []


def test_write_safetensors_streamed(tmp_path):
    """Tensors written one at a time (header last) read back exactly, in torch's safetensors too; a tensor that was
    not announced, or one announced that never comes, fails in one line and leaves no file."""
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    arrays = {f"layer.{i}.weight": rng.standard_normal((3, i + 1)).astype(np.float32) for i in range(5)}
    arrays["fortran"] = np.asfortranarray(rng.standard_normal((4, 2)).astype(np.float32))
    path = tmp_path / "model.safetensors"
    write_safetensors_streamed(path, list(arrays), iter(arrays.items()))
    assert os.listdir(tmp_path) == ["model.safetensors"]
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    with open_checkpoint(path) as ckpt:
        assert ckpt.metadata == {"format": "pt"} and sorted(ckpt) == sorted(arrays)
        assert all(np.array_equal(ckpt[k], v) for k, v in arrays.items())
    assert all(np.array_equal(t.numpy(), arrays[k]) for k, t in load_file(path).items())

    other = tmp_path / "other.safetensors"
    msg = error_of(write_safetensors_streamed, other, ["a"], iter([("b", np.zeros(2, np.float32))]))
    assert msg.startswith("other.safetensors: tensor 'b' was not announced")
    msg = error_of(write_safetensors_streamed, other, ["a", "b"], iter([("a", np.zeros(2, np.float32))]))
    assert msg.startswith("other.safetensors: 1 announced tensors never came (first: b)")
    assert os.listdir(tmp_path) == ["model.safetensors"]


def _safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    blob = header.encode() + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(blob)) + blob + np.ones(16, np.float32).tobytes()


def test_safetensors_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    good = _safetensors_bytes()
    path.write_bytes(good)
    assert np.array_equal(open_checkpoint(tmp_path)["w"], np.ones((4, 4), np.float32))

    path.write_bytes(good[:-10])
    msg = error_of(open_checkpoint, tmp_path)
    assert msg == ("model.safetensors: file is truncated: header says 64 bytes of tensor data, "
                   "found 54")

    path.write_bytes(struct.pack("<Q", 10**9) + good[8:])
    msg = error_of(open_checkpoint, tmp_path)
    assert msg.startswith("model.safetensors: header length 1000000000 is larger than the file")

    path.write_bytes(struct.pack("<Q", 6) + b"{nope\n")
    assert "not valid JSON" in error_of(open_checkpoint, path)

    path.write_bytes(b"abc")
    assert "too short" in error_of(open_checkpoint, path)

    bad = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    path.write_bytes(struct.pack("<Q", len(bad)) + bad + bytes(64))
    assert "do not fit shape [4, 4]" in error_of(open_checkpoint, path)


def test_missing_weights_in_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    msg = error_of(open_checkpoint, tmp_path)
    assert msg.startswith(str(tmp_path))
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        assert name in msg
    assert "no such checkpoint" in error_of(open_checkpoint, tmp_path / "absent")


def test_index_pointing_to_missing_shard(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(_safetensors_bytes())
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                            "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = error_of(open_checkpoint, tmp_path)
    assert msg.startswith("model.safetensors.index.json: shard 'model-00002-of-00002.safetensors'")
    index["weight_map"] = {"w": "model-00001-of-00002.safetensors",
                           "v": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "tensor 'v' is mapped to shard" in error_of(open_checkpoint, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert "weight_map" in error_of(open_checkpoint, tmp_path)


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_transformers_sharded_safetensors(tmp_path, tiny_bert):
    tiny_bert.save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    state = tiny_bert.state_dict()
    with open_checkpoint(tmp_path) as ckpt:
        assert len(ckpt.files) > 1
        assert_same(ckpt, {k: v for k, v in state.items() if k in ckpt})
        assert set(state) - set(ckpt) <= {"embeddings.position_ids"}  # buffers may be dropped


def test_sharded_bin_like_transformers(tmp_path, tiny_bert):
    # transformers 5 always saves safetensors (safe_serialization=False is ignored), so the
    # sharded .bin layout of transformers 4 is written the way it did: torch.save per shard.
    from huggingface_hub import split_torch_state_dict_into_shards

    state = tiny_bert.state_dict()
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="8KB")
    assert split.is_sharded
    for filename, names in split.filename_to_tensors.items():
        torch.save({k: state[k].contiguous() for k in names}, tmp_path / filename)
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "pytorch" and len(ckpt.files) == len(split.filename_to_tensors)
        assert_same(ckpt, state)
    # an unsharded bin of the same model
    torch.save(state, tmp_path / "single.bin")
    assert_same(open_checkpoint(tmp_path / "single.bin"), state)


def test_written_safetensors_load_in_transformers(tmp_path, tiny_bert):
    import transformers

    src, dst = tmp_path / "src", tmp_path / "dst"
    torch.save(tiny_bert.state_dict(), src.mkdir() or src / "pytorch_model.bin")
    with open_checkpoint(src) as ckpt:
        write_safetensors(dst.mkdir() or dst / "model.safetensors", {k: ckpt[k] for k in ckpt})
    tiny_bert.config.save_pretrained(dst)
    loaded = transformers.BertModel.from_pretrained(dst).eval()
    for name, value in tiny_bert.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, tiny_bert(ids).last_hidden_state)


# --------------------------------------------------------------------------- hostile files cost bounded work


def zip_archive(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip archive written field by field, so that it can lie: (name, data as stored, method, crc, declared
    uncompressed size) per member."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        raw, offset = name.encode(), len(out)
        out += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), size, len(raw), 0)
        out += raw + data
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(data), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    return bytes(out + central + end)


def deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of ``size`` zero bytes (a multiple of 1 MiB) in ~size / 1000 bytes, without compressing
    them all: after a full flush the compressor emits the same block for every further MiB of zeros."""
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH) == block
    return block * (size >> 20) + c.flush()


PEAK_RSS = """
import json, resource, sys
from speechseq.errors import CheckpointError
from speechseq.checkpoints.readers import open_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    open_checkpoint(sys.argv[1])
    msg = None
except CheckpointError as e:
    msg = str(e)
print(json.dumps([msg, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024]))
"""


def open_in_child(path: Path) -> tuple[str | None, float]:
    """open_checkpoint(path) in a fresh interpreter: (its CheckpointError message or None, peak RSS growth in MB)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    msg, grown_mb = json.loads(out.stdout)
    return msg, grown_mb


def test_zip_bomb_data_pkl_is_refused_in_bounded_memory(tmp_path):
    """A ~1 MB pytorch_model.bin whose deflated data.pkl expands to 1 GiB: refused from the central directory's
    sizes before anything is decompressed (before: decompressed whole, ~2 GB RSS for 1 GiB, 4.4 GB for 2 GiB). One
    that understates its size is read only up to the size it declares, and fails its CRC."""
    zeros = deflated_zeros(1 << 30)
    byteorder = ("archive/byteorder", b"little", 0, 0x6D7ADF0C, 6)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(zip_archive([("archive/data.pkl", zeros, 8, 0, 1 << 30), byteorder]))
    assert path.stat().st_size < 1_100_000
    msg, grown_mb = open_in_child(path)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("pytorch_model.bin: zip members expand to 1073741830 bytes, over 8x the ")
    assert msg.endswith("refusing a decompression bomb")
    assert grown_mb < 64, grown_mb

    path.write_bytes(zip_archive([("archive/data.pkl", zeros, 8, 0, 1 << 19), byteorder]))  # understated
    msg, grown_mb = open_in_child(path)
    assert msg is not None and msg.startswith("pytorch_model.bin: corrupt zip archive (Bad CRC-32")
    assert grown_mb < 64, grown_mb


def test_zip_sizes_checked_against_the_file(tmp_path):
    """Central directory sizes that the file cannot hold, a data.pkl over 16 MiB, or members zipfile cannot read
    without a password or that use a method torch never writes fail in one line (before: a 16 MiB data.pkl was
    unpickled, bzip2 decompressed, a size past the end of the file reported by zipfile)."""
    import zlib

    path = tmp_path / "w.bin"
    big = b"\x80\x02" + b"N" * (16 << 20) + b"."  # over the data.pkl limit: torch writes ~100 bytes per tensor
    path.write_bytes(zip_archive([("a/data.pkl", big, 0, zlib.crc32(big), len(big))]))
    assert error_of(open_checkpoint, path) == f"w.bin: a/data.pkl is {len(big)} bytes, over the limit of {16 << 20}"
    pkl = pickle.dumps({}, protocol=2)
    data = zip_archive([("a/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl))])
    path.write_bytes(data.replace(struct.pack("<I", len(pkl)) * 2, struct.pack("<I", len(pkl) + 10**6) * 2))
    msg = error_of(open_checkpoint, path)
    assert msg.startswith(f"w.bin: corrupt or truncated zip archive (member 'a/data.pkl' claims {len(pkl) + 10**6} "
                          f"bytes at offset 0 of a {len(data)}-byte file)"), msg
    path.write_bytes(zip_archive([("a/data.pkl", pkl, 12, zlib.crc32(pkl), len(pkl))]))  # bzip2
    assert error_of(open_checkpoint, path) == ("w.bin: zip member 'a/data.pkl' is encrypted or compressed with "
                                               "method 12; torch.save stores members uncompressed")


def with_data_pkl(tmp_path: Path, data: bytes) -> Path:
    """A torch.save checkpoint whose data.pkl is replaced by ``data``."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "good.bin")
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(tmp_path / "good.bin") as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename.endswith("/data.pkl") else zin.read(info))
    return path


def traced_peak_mb(fn, *args) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        fn(*args)
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("payload, message", [
    # LONG_BINPUT 2**25: the C unpickler grows its memo table to the index (before: 512 MB for 10 bytes)
    (b"\x80\x02Nr" + struct.pack("<I", 1 << 25) + b".", "pickle memo index 33554432 is out of order"),
    # a tuple of 10**6 empty sets, 232 bytes of memory per byte of pickle (before: 232 MB)
    (b"\x80\x04(" + b"\x8f" * 10**6 + b"t.", "refusing pickle opcode EMPTY_SET (only tensor data is allowed)"),
], ids=["memo-index", "sets"])
def test_pickle_bombs_are_refused_in_bounded_memory(tmp_path, payload, message):
    path = with_data_pkl(tmp_path, payload)
    messages: list[str] = []
    peak = traced_peak_mb(lambda: messages.append(error_of(open_checkpoint, path)))
    assert messages[0].startswith(f"pytorch_model.bin: {message}"), messages
    assert peak < 16, peak


def test_deeply_nested_tuple_key_is_refused(tmp_path):
    """A dict key of tuples nested 10**6 deep (1 MB): hashing it recursed in C and killed the process (SIGSEGV)."""
    path = with_data_pkl(tmp_path, b"\x80\x02}" + b")" + b"\x85" * 10**6 + b"K\x01s.")
    msg, _ = open_in_child(path)
    assert msg == "pytorch_model.bin: pickle nests tuples over 100 deep (corrupt or hostile)"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_malicious_pickle_refused_at_every_protocol(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = {"w": _Evil(marker)}
    for data in (pickle.dumps(evil, protocol=protocol), pickle.dumps((1, [evil], {2}), protocol=protocol)):
        msg = error_of(open_checkpoint, with_data_pkl(tmp_path, data))
        assert msg.startswith("pytorch_model.bin: refusing "), msg
        (tmp_path / "plain.bin").write_bytes(data)
        if protocol >= 2:  # a pickle's first byte is PROTO (0x80) from protocol 2 on
            assert "refusing" in error_of(open_checkpoint, tmp_path / "plain.bin")
    assert not marker.exists()


class _View:
    """Pickles as torch.save pickles a tensor, with any shape, stride and offset."""

    def __init__(self, *args) -> None:
        self.args = args

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def raw_tensor_pickle(shape, stride, offset=0, numel=2) -> bytes:
    """data.pkl for {"w": a float32 view (shape, stride, offset) of storage "0" of ``numel`` elements}."""
    storage = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": _View(storage, offset, shape, stride, False, OrderedDict())})
    return buf.getvalue()


@pytest.mark.parametrize("shape, stride, numel, message", [
    ((-3, 5), (5, 1), 2, "has shape (-3, 5), stride (5, 1) and offset 0; expected non-negative ints"),
    ((2.0,), (1,), 2, "has shape (2.0,), stride (1,) and offset 0"),
    ((1 << 40,), (0,), 1, "(shape [1099511627776], stride [0], offset 0) lies outside its storage of 1 elements"),
    ((4,), (1,), 2, "(shape [4], stride [1], offset 0) lies outside its storage of 2 elements"),
], ids=["negative", "float", "broadcast-2**40", "past-the-end"])
def test_bin_tensor_views_checked(tmp_path, shape, stride, numel, message):
    """Shapes, strides and offsets are non-negative ints and a view reads no more than its storage holds (before:
    a negative shape opened, counting -15 parameters; a stride-0 view of 2**40 elements over one element opened)."""
    assert open_checkpoint(with_data_pkl(tmp_path, raw_tensor_pickle((2,), (1,))))["w"].shape == (2,)
    msg = error_of(open_checkpoint, with_data_pkl(tmp_path, raw_tensor_pickle(shape, stride, numel=numel)))
    assert msg.startswith("pytorch_model.bin: tensor 'w' ") and message in msg, msg


def safetensors_file(header: dict | bytes, data: bytes = b"") -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def f32(shape, begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, message", [
    (b'{"a":' * 10**5 + b"1" + b"}" * 10**5, b"", "safetensors header is nested too deeply to be a header"),
    ({"a": f32([2], 0, 8), "b": f32([2], 0, 8)}, bytes(8),
     "tensor 'b' data_offsets [0, 8] overlap the data before them, which ends at byte 8"),
    ({"a": f32([1], 4, 8)}, bytes(8), "tensor 'a' data_offsets [4, 8] leave a gap after the data before them, "
                                      "which ends at byte 0"),
    ({"a": f32([1], 0, 4)}, bytes(8), "4 bytes after the last tensor's data (header covers 4 of 8)"),
    ({"unused": f32([1 << 62, 4, 4], 0, 0), "w": f32([1], 0, 4)}, bytes(4),
     "tensor 'unused' has shape [4611686018427387904, 4, 4]; expected a list of at most 64 non-negative ints, "
     "under 2**63 bytes in all"),
    ({"w": f32([1 << 64], 0, 0)}, b"", "tensor 'w' has shape [18446744073709551616]"),
    ({"w": f32([-1, -4], 0, 16)}, bytes(16), "tensor 'w' has shape [-1, -4]"),
    ({"w": f32([1.0], 0, 4)}, bytes(4), "tensor 'w' has shape [1.0]"),
    ({"w": f32([True], 0, 4)}, bytes(4), "tensor 'w' has shape [True]"),
    ({"w": f32([1], "0", "4")}, bytes(4), "tensor 'w' data_offsets ['0', '4'] must be [begin, end], two "
                                          "non-negative ints"),
    ({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
     "tensor 'w' has unsupported dtype 'F33' (supported: F64, "),
    ({"__metadata__": {"format": 1}, "w": f32([1], 0, 4)}, bytes(4), "safetensors __metadata__ must map str to str"),
], ids=["nested-1e5", "overlap", "gap", "tail", "2**66-elements", "2**64-dim", "negative", "float", "bool",
        "str-offsets", "dtype", "metadata"])
def test_safetensors_header_validated_up_front(tmp_path, header, data, message):
    """Every header entry is checked at open as the safetensors library checks it (before: a RecursionError
    traceback, overlapping, gapped and trailing data, a 2**66-element unused tensor, float and bool dimensions,
    string offsets and non-string metadata all opened, a 2**64 dimension raised OverflowError)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_file(header, data))
    msg = error_of(open_checkpoint, path)
    assert msg.startswith(f"model.safetensors: {message}"), msg


def test_safetensors_header_size_capped(tmp_path):
    """A header over the safetensors library's 100 MB limit is refused without reading it (before: read and
    parsed, 200 MB)."""
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(safetensors_file(b"{}" + b" " * (100_000_001 - 2))[:10])
        f.truncate(8 + 100_000_001)  # sparse: the header's bytes past "{}" read as zeros
    messages: list[str] = []
    peak = traced_peak_mb(lambda: messages.append(error_of(open_checkpoint, path)))
    assert messages == ["model.safetensors: header length 100000001 is over the safetensors limit of 100000000 bytes"]
    assert peak < 16, peak


def test_index_hostile_json(tmp_path):
    """Deeply nested JSON and shard names the file system cannot take fail in one line (before: RecursionError,
    OSError 'File name too long')."""
    (tmp_path / "model.safetensors").write_bytes(_safetensors_bytes())
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 10**5 + "]" * 10**5 + "}")
    assert error_of(open_checkpoint, index) == ("model.safetensors.index.json: index is nested too deeply to be a "
                                                "weight index")
    index.write_text(json.dumps({"weight_map": {"w": "a\0b"}}))
    assert error_of(open_checkpoint, index).startswith("model.safetensors.index.json: shard 'a\\x00b' listed in "
                                                       "weight_map does not exist")
    index.write_text(json.dumps({"weight_map": {"w": "x" * 300}}))
    assert "does not exist" in error_of(open_checkpoint, index)
    index.write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    assert open_checkpoint(index)["w"].shape == (4, 4)


def test_bin_high_rank_views_and_broadcast_rows_still_load(tmp_path):
    """What the view checks must keep: 12 dimensions, transposed (the product of the strides is 2**66) and HF's
    position_ids, arange(n).expand((1, -1)) (stride 0 over as many elements as its storage)."""
    state = {"rank12": torch.arange(4096.0).reshape((2,) * 12).permute(*reversed(range(12))),
             "position_ids": torch.arange(16).expand((1, -1))}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        assert_same(ckpt, state)
