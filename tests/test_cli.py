"""The `speechseq` command: convert, export, inspect, and their bad-input behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import hf_factory as F
from speechseq.cli import main
from speechseq.checkpoints.readers import open_checkpoint, write_safetensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    F.seq2seq("w2v-layer-stable", "bart", tie=False).save_pretrained(path)
    return path


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def tensors(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k] for k in ckpt}


def test_convert_then_export_is_bit_exact(hf_dir, tmp_path, capsys):
    code, out, err = run(capsys, "convert", hf_dir, tmp_path / "ss", "--verify")
    assert code == 0, err
    assert "converted" in out
    diff = float(out.split("max |logits - transformers| = ")[1].split()[0])
    assert diff < 1e-4
    code, out, err = run(capsys, "export", tmp_path / "ss", tmp_path / "back")
    assert code == 0, err
    src, back = tensors(hf_dir), tensors(tmp_path / "back")
    assert set(back) == set(src)
    for k in src:
        assert back[k].dtype == src[k].dtype and np.array_equal(back[k], src[k]), k
    # the exported checkpoint loads in transformers with the same weights
    import transformers

    model = transformers.SpeechEncoderDecoderModel.from_pretrained(tmp_path / "back")
    sd = model.state_dict()
    assert np.array_equal(sd["decoder.lm_head.weight"].numpy(), src["decoder.lm_head.weight"])


def test_convert_streams_in_batches(hf_dir, tmp_path, capsys, monkeypatch):
    """With a tiny batch budget every parameter is written by its own partial save, one batch resident at a time;
    the checkpoint is still one params/ tree that restores and exports bit for bit."""
    from speechseq.checkpoints import storage

    sizes = []
    streaming = storage.save_params_streaming

    def spy(directory, batches):
        def counted():
            for batch in batches:
                sizes.append(len(batch))
                yield batch
        streaming(directory, counted())

    monkeypatch.setattr(storage, "CONCURRENT_GB", 1e-9)
    monkeypatch.setattr(storage, "save_params_streaming", spy)
    code, _, err = run(capsys, "convert", hf_dir, tmp_path / "ss")
    assert code == 0, err
    assert len(sizes) > 10 and max(sizes) <= 3, sizes  # a rule gives at most 3 params (fused GPT-2 q/k/v)
    left = sorted(p.name for p in (tmp_path / "ss").iterdir())
    assert "params" in left and not [n for n in left if "partial" in n], left  # no staging folder left behind
    code, _, err = run(capsys, "export", tmp_path / "ss", tmp_path / "back")
    assert code == 0, err
    src, back = tensors(hf_dir), tensors(tmp_path / "back")
    assert set(back) == set(src) and all(np.array_equal(back[k], src[k]) for k in src)


def test_convert_bfloat16_and_load(hf_dir, tmp_path, capsys):
    code, _, err = run(capsys, "convert", hf_dir, tmp_path / "bf", "--dtype", "bfloat16")
    assert code == 0, err
    from speechseq import SpeechSeq2Seq

    a = SpeechSeq2Seq.from_pretrained(hf_dir)
    b = SpeechSeq2Seq.from_pretrained(tmp_path / "bf")
    x, m = F.audio_batch()
    ids = F.tokens(2, 5)
    diff = np.abs(np.asarray(a(x, m, decoder_input_ids=ids).logits) - np.asarray(b(x, m, decoder_input_ids=ids).logits))
    assert 0 < diff.max() < 0.2  # bf16-rounded weights: close, not equal


def test_inspect(hf_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", hf_dir, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["encoder"].startswith("wav2vec2") and info["decoder"].startswith("bart")
    assert info["parameters"] == sum(v.size for v in tensors(hf_dir).values())
    assert info["fresh_weights"] == []
    # a checkpoint lacking a tensor: inspect names it as freshly initialised
    t = tensors(hf_dir)
    name = "decoder.model.decoder.layers.0.encoder_attn.q_proj.weight"
    del t[name]
    partial = tmp_path / "partial"
    partial.mkdir()
    write_safetensors(partial / "model.safetensors", t)
    (partial / "config.json").write_text((hf_dir / "config.json").read_text())
    code, out, _ = run(capsys, "inspect", partial, "--json")
    assert json.loads(out)["fresh_weights"] == [name]
    # and convert refuses it, leaving no destination behind
    code, _, err = run(capsys, "convert", partial, tmp_path / "never")
    assert code == 2 and "missing" in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_existing_destination_is_not_overwritten(hf_dir, tmp_path, capsys):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", hf_dir, dst)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (dst / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier checkpoint, never a folder holding other files (tests/test_data_safety.py)
    code, _, err = run(capsys, "convert", hf_dir, dst, "--force")
    assert code == 2 and "keep.txt" in err and (dst / "keep.txt").read_text() == "mine"
    (dst / "keep.txt").unlink()
    (dst / "config.json").write_text("{}")
    code, _, err = run(capsys, "convert", hf_dir, dst, "--force")
    assert code == 0 and (dst / "speechseq.json").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["convert", "{tmp}/nothing", "{tmp}/out"], "no such directory"),
    (["convert", "{tmp}/empty", "{tmp}/out"], "config.json"),
    (["export", "{hf}", "{tmp}/out"], "not a speechseq checkpoint"),
    (["inspect", "{tmp}/noweights"], "model.safetensors"),
    (["transcribe", "--model", "{hf}", "{tmp}/missing.wav"], "no such file"),
])
def test_bad_input_one_line_exit_2(hf_dir, tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((hf_dir / "config.json").read_text())
    code, out, err = run(capsys, *[a.format(tmp=tmp_path, hf=hf_dir) for a in argv])
    assert code == 2
    assert err.startswith("speechseq: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_hub_id_while_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    code, _, err = run(capsys, "inspect", "someone/not-cached-model")
    assert code == 2 and "offline" in err and err.count("\n") == 1


def test_console_script_help(capsys):
    """The module runs as a program; every subcommand has its help."""
    r = subprocess.run([sys.executable, "-m", "speechseq.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: speechseq" in r.stdout
    for cmd in ("transcribe", "convert", "export", "inspect"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0 and f"usage: speechseq {cmd}" in capsys.readouterr().out, cmd


def test_command_starts_without_jax():
    """``import speechseq.cli`` (the command's start) does not import jax: ``speechseq --help`` answers at once."""
    r = subprocess.run([sys.executable, "-c", "import sys, speechseq.cli; print('jax' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    import speechseq  # the lazy names are still listed and load on use

    assert {"SpeechSeq2Seq", "Processor", "SpeechSeq2SeqConfig"} <= set(dir(speechseq))
    assert speechseq.SpeechSeq2Seq.__name__ == "SpeechSeq2Seq"


@pytest.mark.parametrize("name, content, words", [
    ("list.jsonl", b'{"audio": 5}\n', ["list.jsonl:1", "'audio'", "file path", "got 5"]),
    ("list.jsonl", b'{"audio": null}\n', ["list.jsonl:1", "'audio'", "got None"]),
    ("list.jsonl", b'{"path": ["a.wav"]}\n', ["list.jsonl:1", "'path'", "got ['a.wav']"]),
    ("list.jsonl", b'{"audio": ""}\n', ["list.jsonl:1", "'audio'", "got ''"]),
    ("list.jsonl", b'\n["a.wav"]\n', ["list.jsonl:2", "JSON object"]),
    ("list.jsonl", b'"a.wav"\n', ["list.jsonl:1", "JSON object"]),
    ("list.txt", b"caf\xe9.wav\n", ["list.txt", "not UTF-8", "byte 3"]),
    ("list.tsv", b"\xff\xfea\x00", ["list.tsv", "not UTF-8"]),
])
def test_bad_manifest_one_line_exit_2(hf_dir, tmp_path, capsys, name, content, words):
    (tmp_path / name).write_bytes(content)
    code, _, err = run(capsys, "transcribe", "--model", hf_dir, tmp_path / name)
    assert code == 2 and err.startswith("speechseq: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("field, value", [("decoder_layers", -1), ("decoder_layers", 0), ("d_model", "wide")])
def test_inspect_bad_config_value_one_line_exit_2(hf_dir, tmp_path, capsys, field, value):
    """``inspect`` once printed "-1 layers" for such a config."""
    dst = tmp_path / "ckpt"
    dst.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["decoder"][field] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    code, out, err = run(capsys, "inspect", dst)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"[decoder]: field '{field}'" in err and repr(value) in err, err
