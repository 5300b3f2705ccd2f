"""Tests for speechseq.weights.readers: torch-free checkpoint reading and safetensors writing."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from speechseq.errors import CheckpointError
from speechseq.weights.readers import Checkpoint, open_checkpoint, write_safetensors, write_safetensors_streamed

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
        "from speechseq.weights.readers import open_checkpoint\n"
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
