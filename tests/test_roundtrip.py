"""Checkpoints in and out: transformers -> speechseq -> transformers gives identical tensors; old weight-norm names,
.bin and sharded .bin checkpoints load with the same logits, with or without torch installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.checkpoints.readers import open_checkpoint, write_safetensors

REPO = Path(__file__).resolve().parents[1]
ROUNDTRIP_ENCODERS = ["w2v-group", "w2v-layer-stable", "w2v-adapter-same", "hubert"]
POS_CONV = "encoder.encoder.pos_conv_embed.conv."
OLD_WEIGHT_NORM = {POS_CONV + "parametrizations.weight.original0": POS_CONV + "weight_g",
                   POS_CONV + "parametrizations.weight.original1": POS_CONV + "weight_v"}


def hf_logits(model, x, mask, labels):
    return F.hf_forward(model, input_values=x, attention_mask=mask, labels=labels).logits


def inputs():
    x, mask = F.audio_batch((1600, 1100))
    labels = F.tokens(2, 6)
    labels[1, 4:] = -100
    return x, mask, labels


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dec", F.DECODERS)
@pytest.mark.parametrize("enc", ROUNDTRIP_ENCODERS)
def test_transformers_speechseq_transformers(tmp_path, enc, dec, tie):
    hf = F.seq2seq(enc, dec, tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    ours = SpeechSeq2Seq.from_pretrained(tmp_path / "hf")
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    ours.save_pretrained(tmp_path / "ours")
    back, info = transformers.SpeechEncoderDecoderModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    F.assert_same_state_dict(back.state_dict(), hf.state_dict())
    written, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "hf"))
    for key in ("encoder", "decoder", "decoder_start_token_id", "pad_token_id", "model_type"):
        assert written[key] == theirs[key], key
    x, mask, labels = inputs()
    assert torch.equal(hf_logits(back.eval(), x, mask, labels), hf_logits(hf, x, mask, labels))
    # speechseq's own export is what it reads back
    again = SpeechSeq2Seq.from_pretrained(tmp_path / "ours")
    with open_checkpoint(tmp_path / "ours") as ckpt:
        assert sorted(ckpt) == sorted(ours.state_dict())
    for name, value in ours.state_dict().items():
        assert np.array_equal(again.state_dict()[name], value), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A transformers checkpoint (safetensors) with speechseq's logits on it and transformers' own."""
    path = tmp_path_factory.mktemp("reference")
    hf = F.seq2seq("w2v-layer-stable", "bart-scaled", tie=False)
    hf.save_pretrained(path)
    x, mask, labels = inputs()
    ours = SpeechSeq2Seq.from_pretrained(path)
    logits = np.asarray(ours(x, mask, labels=labels).logits)
    torch_logits = F.to_numpy(hf_logits(hf, x, mask, labels))
    assert F.max_abs_diff(logits, torch_logits) <= 1e-4
    return hf, path, logits, torch_logits


def load_logits(path: Path) -> np.ndarray:
    ours = SpeechSeq2Seq.from_pretrained(path)
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    x, mask, labels = inputs()
    return np.asarray(ours(x, mask, labels=labels).logits)


def test_old_weight_norm_names(tmp_path, reference):
    hf, src, logits, _ = reference
    with open_checkpoint(src) as ckpt:
        assert set(OLD_WEIGHT_NORM) <= set(ckpt)
        tensors = {OLD_WEIGHT_NORM.get(name, name): ckpt[name] for name in ckpt}
    assert set(OLD_WEIGHT_NORM.values()) <= set(tensors)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    assert np.array_equal(load_logits(tmp_path), logits)
    # what speechseq writes back uses the current (parametrizations) names
    SpeechSeq2Seq.from_pretrained(tmp_path).save_pretrained(tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert set(OLD_WEIGHT_NORM) <= set(ckpt) and not set(OLD_WEIGHT_NORM.values()) & set(ckpt)


def write_bin(state: dict, directory: Path, max_shard_size: str | None = None) -> None:
    """A transformers-4 style ``pytorch_model.bin`` (or shards + index): transformers 5 only writes safetensors."""
    if max_shard_size is None:
        torch.save(state, directory / "pytorch_model.bin")
        return
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    assert split.is_sharded and len(split.filename_to_tensors) > 2
    for filename, names in split.filename_to_tensors.items():
        torch.save({k: state[k].contiguous() for k in names}, directory / filename)
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}))


@pytest.mark.parametrize("max_shard_size", [None, "4KB"], ids=["single", "sharded"])
def test_bin_checkpoint(tmp_path, reference, max_shard_size):
    hf, _, logits, _ = reference
    write_bin(hf.state_dict(), tmp_path, max_shard_size)
    hf.config.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    assert np.array_equal(load_logits(tmp_path), logits)


def test_bin_checkpoint_without_torch(tmp_path, reference):
    hf, _, _, torch_logits = reference
    write_bin(hf.state_dict(), tmp_path)
    hf.config.save_pretrained(tmp_path)
    x, mask, labels = inputs()
    np.savez(tmp_path / "inputs.npz", x=x, mask=mask, labels=labels)
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('torch is importable')\n"
        "import json, numpy as np\n"
        "from speechseq import SpeechSeq2Seq\n"
        "d = sys.argv[1]\n"
        "data = np.load(d + '/inputs.npz')\n"
        "m = SpeechSeq2Seq.from_pretrained(d)\n"
        "logits = np.asarray(m(data['x'], data['mask'], labels=data['labels']).logits, np.float64)\n"
        "loaded = sorted({k.split('.')[0] for k, v in sys.modules.items() if v})\n"
        "print(json.dumps({'sum': logits.sum(), 'abs': np.abs(logits).sum(), 'first': logits.ravel()[:8].tolist(),\n"
        "                  'missing': m.loading_info.missing, 'unexpected': m.loading_info.unexpected,\n"
        "                  'torch': 'torch' in loaded, 'transformers': 'transformers' in loaded}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["missing"] == [] and got["unexpected"] == []
    assert not got["torch"] and not got["transformers"]
    want = torch_logits.astype(np.float64)
    assert abs(got["sum"] - want.sum()) <= 1e-4 * want.size ** 0.5
    assert abs(got["abs"] - np.abs(want).sum()) <= 1e-4 * want.size ** 0.5
    np.testing.assert_allclose(got["first"], want.ravel()[:8], rtol=0, atol=1e-4)
