"""Nothing a user has is ever lost: what ``convert`` / ``export --force`` may replace, a destination that appears
while a conversion runs, and conversions stopped by SIGINT, SIGTERM or SIGKILL (no partial folder is left behind)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hf_factory as F
from speechseq.checkpoints import storage
from speechseq.cli import main
from speechseq.checkpoints.convert import convert


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    F.seq2seq("w2v-layer-stable", "bart", tie=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ss_dir(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ss") / "ss"
    convert(hf_dir, path, progress=False)
    return path


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what a case must leave exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Partial or moved-aside folders left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2 and err.startswith("speechseq: error: ") and err.count("\n") == 1, err
    assert needle in err, err


# -- 1. what --force may replace ----------------------------------------------------------------------------------

def _case(name: str, tmp: Path, hf_dir: Path, ss_dir: Path) -> tuple[list, Path, str]:
    """(argv, the folder that must stay as it was, words of the error) for each destination --force must refuse."""
    model = tmp / "parent" / "model"
    shutil.copytree(hf_dir, model)
    (tmp / "parent" / "notes.txt").write_text("mine")
    earlier = tmp / "earlier"
    shutil.copytree(ss_dir, earlier)  # an earlier checkpoint: --force could replace it, but for the case's reason
    if name == "source":
        return ["convert", model, model, "--force"], tmp, "is the source checkpoint"
    if name == "holds-source":
        return ["convert", model, tmp / "parent", "--force"], tmp, "holds the source checkpoint"
    if name == "inside-source":
        shutil.copytree(ss_dir, tmp / "ss")
        return ["export", tmp / "ss", tmp / "ss" / "params", "--force"], tmp, "inside the source checkpoint"
    if name == "cwd":
        os.chdir(earlier)
        return ["convert", "../parent/model", ".", "--force"], tmp, "working directory"
    if name == "cwd-ancestor":
        os.chdir(earlier / "params")
        return ["convert", model, earlier, "--force"], tmp, "working directory"
    if name == "foreign-file":
        (earlier / "notes.txt").write_text("mine")
        return ["convert", model, earlier, "--force"], tmp, "holds notes.txt, which is not a checkpoint file"
    if name == "foreign-folder":
        (earlier / "runs").mkdir()
        return ["convert", model, earlier, "--force"], tmp, "holds runs, which is not a checkpoint file"
    if name == "file":
        (tmp / "out.bin").write_bytes(b"mine")
        return ["convert", model, tmp / "out.bin", "--force"], tmp, "is a file"
    if name == "symlink":
        (tmp / "link").symlink_to(earlier)
        return ["convert", model, tmp / "link", "--force"], tmp, "symbolic link"
    raise KeyError(name)


@pytest.mark.parametrize("case", ["source", "holds-source", "inside-source", "cwd", "cwd-ancestor", "foreign-file",
                                  "foreign-folder", "file", "symlink"])
def test_force_never_replaces_what_is_not_an_earlier_checkpoint(case, hf_dir, ss_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, keep, needle = _case(case, tmp_path, hf_dir, ss_dir)
    before = files(keep)
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert files(keep) == before
    assert not hidden(tmp_path) and not hidden(tmp_path / "parent")


def test_destination_file_refused_without_force_too(hf_dir, tmp_path, capsys):
    (tmp_path / "out").write_bytes(b"mine")
    code, _, err = run(capsys, "convert", hf_dir, tmp_path / "out")
    assert_one_line_error(code, err, "is a file")
    assert (tmp_path / "out").read_bytes() == b"mine"


def test_force_replaces_an_earlier_checkpoint(hf_dir, ss_dir, tmp_path, capsys):
    code, _, _ = run(capsys, "convert", hf_dir, tmp_path / "ss")
    assert code == 0
    code, _, err = run(capsys, "convert", hf_dir, tmp_path / "ss", "--dtype", "bfloat16", "--force")
    assert code == 0, err
    assert "bfloat16" in (tmp_path / "ss" / storage.MARKER).read_text()
    code, _, _ = run(capsys, "export", ss_dir, tmp_path / "hf")
    assert code == 0
    code, _, err = run(capsys, "export", tmp_path / "ss", tmp_path / "hf", "--force")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["hf", "ss"]  # no partial or moved-aside folder left


# -- 2. the final rename replaces nothing it did not check ----------------------------------------------------------

def during_conversion(monkeypatch, action) -> None:
    """Run ``action()`` once while a conversion runs (after its params are written, before its side files)."""
    original, done = storage.copy_side_files, []

    def copy_side_files(src, dst):
        if not done:
            done.append(True)
            action()
        return original(src, dst)

    monkeypatch.setattr(storage, "copy_side_files", copy_side_files)


def test_destination_that_appears_is_not_replaced(hf_dir, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "out"
    during_conversion(monkeypatch, lambda: (dst.mkdir(), (dst / "mine.txt").write_text("mine")))
    code, _, err = run(capsys, "convert", hf_dir, dst)
    assert_one_line_error(code, err, "appeared while")
    assert files(dst) == {"mine.txt": b"mine"} and not hidden(tmp_path)


def test_empty_folder_that_appears_is_not_replaced(hf_dir, tmp_path, capsys, monkeypatch):
    """os.rename puts a folder over an empty one: the rename must not (someone may be about to fill it)."""
    dst = tmp_path / "out"
    during_conversion(monkeypatch, dst.mkdir)
    code, _, err = run(capsys, "convert", hf_dir, dst)
    assert_one_line_error(code, err, "appeared while")
    assert dst.is_dir() and not os.listdir(dst) and not hidden(tmp_path)


def test_two_conversions_into_one_new_folder(hf_dir, tmp_path, capsys, monkeypatch):
    """The second conversion into a new folder finishes first; the first then reports an error, not success."""
    dst = tmp_path / "out"
    during_conversion(monkeypatch, lambda: convert(hf_dir, dst, dtype="bfloat16", progress=False))
    code, _, err = run(capsys, "convert", hf_dir, dst)
    assert_one_line_error(code, err, "appeared while")
    assert "bfloat16" in (dst / storage.MARKER).read_text() and not hidden(tmp_path)


def test_force_rechecks_the_destination_at_the_end(hf_dir, ss_dir, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "earlier"
    shutil.copytree(ss_dir, dst)
    during_conversion(monkeypatch, lambda: (dst / "notes.txt").write_text("written meanwhile"))
    before = {**files(dst), "notes.txt": b"written meanwhile"}
    code, _, err = run(capsys, "convert", hf_dir, dst, "--force")
    assert_one_line_error(code, err, "holds notes.txt")
    assert files(dst) == before and not hidden(tmp_path)


def test_force_puts_the_earlier_checkpoint_back_when_the_rename_fails(hf_dir, ss_dir, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "earlier"
    shutil.copytree(ss_dir, dst)
    before = files(dst)
    rename = storage.rename_noreplace

    def failing(src, to):
        if ".partial-" in str(src):  # the new folder's rename, after the earlier one was moved aside
            raise PermissionError(13, "Permission denied")
        rename(src, to)

    monkeypatch.setattr(storage, "rename_noreplace", failing)
    code, _, err = run(capsys, "convert", hf_dir, dst, "--force")
    assert_one_line_error(code, err, "earlier checkpoint is unchanged")
    assert files(dst) == before and not hidden(tmp_path)


def test_rename_noreplace(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("mine")
    for target in ("empty", "file"):
        with pytest.raises(FileExistsError):
            storage.rename_noreplace(tmp_path / "new", tmp_path / target)
    assert (tmp_path / "file").read_text() == "mine" and not os.listdir(tmp_path / "empty")
    storage.rename_noreplace(tmp_path / "new", tmp_path / "moved")
    assert (tmp_path / "moved" / "f").read_text() == "new"


# -- 3. interrupted and killed conversions -------------------------------------------------------------------------

def tag(pid: int, start: int | None = None, boot: str | None = None, host: str | None = None) -> str:
    """The owner part of a partial folder's name, as storage writes it."""
    start = storage._start_time(pid) if start is None else start
    return f"{pid}-{start or 0}-{storage._BOOT if boot is None else boot}-{host or storage._HOST}"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_go_live_ones_stay(hf_dir, tmp_path):
    me = os.getpid()
    start = storage._start_time(me)
    names = {
        "live": f".a.partial-{tag(me)}-0123abcd",
        "pid-reused": f".b.partial-{tag(me, start=start + 1)}-0123abcd" if start else None,
        "dead": f".c.partial-{tag(dead_pid(), start=1)}-0123abcd",
        "earlier-boot": f".d.partial-{tag(me, boot='00000000')}-0123abcd" if storage._BOOT else None,
        "other-host": f".e.partial-{tag(dead_pid(), start=1, host='elsewhere')}-0123abcd",
        "not-ours": ".f.partial-0123abcd",
    }
    for name in filter(None, names.values()):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params").mkdir()
    convert(hf_dir, tmp_path / "out", progress=False)
    left = set(os.listdir(tmp_path))
    assert {names["live"], names["other-host"], names["not-ours"], "out"} == left


def test_killed_force_replacement_is_undone_by_the_next_run(hf_dir, ss_dir, tmp_path):
    """Killed between moving the earlier checkpoint aside and renaming the new one in: the next run puts it back;
    killed after the new one is in: the next run deletes the old one."""
    gone = tag(dead_pid(), start=1)
    shutil.copytree(ss_dir, tmp_path / f".a.old-{gone}-0123abcd")
    shutil.copytree(ss_dir, tmp_path / "b")
    shutil.copytree(ss_dir, tmp_path / f".b.old-{gone}-0123abcd")
    convert(hf_dir, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "out"]
    assert files(tmp_path / "a") == files(ss_dir)


def test_save_pretrained_leaves_no_partial(hf_dir, tmp_path, monkeypatch):
    from speechseq import SpeechSeq2Seq
    from speechseq.checkpoints import hf as checkpoint

    model = SpeechSeq2Seq.from_pretrained(hf_dir)
    (tmp_path / f".speechseq-save.partial-{tag(dead_pid(), start=1)}-0123abcd").mkdir()  # from a killed save

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", fail)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path)) and not hidden(tmp_path)


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    """A random checkpoint of ~550 MB, so that a conversion still runs (for seconds) when it is signalled."""
    import torch
    import transformers as T

    from speechseq.checkpoints.readers import write_safetensors

    enc = F.any_encoder_config("w2v-layer-stable", hidden_size=256, num_hidden_layers=4, intermediate_size=1024,
                               num_attention_heads=4)
    dec = F.decoder_config("bart", hidden=256, tie=False)
    dec.vocab_size = 250_000
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 0, 1
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T.SpeechEncoderDecoderModel(cfg).state_dict().items()}
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("big") / "big"
    path.mkdir()
    write_safetensors(path / "model.safetensors", {k: rng.random(s, dtype=np.float32) for k, s in shapes.items()})
    cfg.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def big_ss(big_hf):
    path = big_hf.parent / "big-ss"
    convert(big_hf, path, progress=False)
    return path


def start(argv: list, cwd: Path) -> subprocess.Popen:
    """``python -m speechseq.cli`` with SIGINT and SIGTERM at their defaults, as in a terminal (a process started in
    the background by a shell ignores SIGINT, and its children inherit that)."""
    saved = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return subprocess.Popen([sys.executable, "-m", "speechseq.cli", "-q", *map(str, argv)], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def wait_until_writing(p: subprocess.Popen, parent: Path, name: str, inside: str = "*", timeout: float = 120) -> Path:
    """The partial folder of ``name`` once it holds ``inside`` (a glob): the conversion is writing into it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.poll() is None:
        for partial in parent.glob(f".{name}.partial-*"):
            if any(partial.glob(inside)):
                return partial
        time.sleep(0.005)
    p.kill()
    pytest.fail(f"no partial folder being written (exit status {p.poll()}): {p.communicate()[1][-2000:]}")


# convert: while orbax's threads write the first batch (its array metadata is there), where an interrupt used to
# remove the folder under them; export: once the safetensors file is being written
WRITING = {"convert": "params_partial*/state/array_metadatas/*", "export": "*"}


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("signum, message", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_signal_removes_the_partial_folder(command, signum, message, big_hf, big_ss, tmp_path):
    src = big_hf if command == "convert" else big_ss
    p = start([command, src, tmp_path / "out"], tmp_path)
    partial = wait_until_writing(p, tmp_path, "out", WRITING[command])
    p.send_signal(signum)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signum and err == f"speechseq: {message}\n", (p.returncode, err[-3000:])
    assert os.listdir(tmp_path) == []
    assert f"-{p.pid}-" in partial.name  # the partial folder named its process


@pytest.mark.parametrize("command", ["convert", "export"])
def test_kill_9_partial_is_removed_by_the_next_run(command, hf_dir, ss_dir, big_hf, big_ss, tmp_path):
    p = start([command, big_hf if command == "convert" else big_ss, tmp_path / "out"], tmp_path)
    partial = wait_until_writing(p, tmp_path, "out", WRITING[command])
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert partial.is_dir()  # nothing can clean up after kill -9 ...
    code = main(["-q", command, str(hf_dir if command == "convert" else ss_dir), str(tmp_path / "next")])
    assert code == 0 and sorted(os.listdir(tmp_path)) == ["next"]  # ... but the next run into that folder does


@pytest.mark.parametrize("binary", [False, True])
def test_atomic_file_interrupted_as_its_file_opens(tmp_path, monkeypatch, binary):
    """A signal whose handler raises just after ``open`` returned inside ``storage.atomic_file`` (the file object made
    but never bound, so dropped at once) ends in that exception alone: no ``OSError`` from closing a descriptor the
    dropped object had already closed (a traceback under SIGTERM in CI), no temporary file, the old file kept."""
    target = tmp_path / "config.json"
    target.write_text("old")
    real_open = open

    def open_then_interrupt(*args, **kwargs):
        real_open(*args, **kwargs)  # made and dropped, as when the handler runs before the assignment
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "open", open_then_interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        with storage.atomic_file(target, binary=binary) as f:
            f.write(b"new" if binary else "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
