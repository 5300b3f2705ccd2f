"""speechseq checkpoints: the HF config files beside an orbax checkpoint of the params pytree.

Layout of a speechseq checkpoint directory::

    speechseq.json            {"format": "speechseq", "version": 1, "dtype": "float32"}
    config.json               the Hugging Face speech-encoder-decoder config
    generation_config.json    (when the source had one)
    params/                   orbax checkpoint; restores straight into sharded arrays given a target with shardings
    tokenizer / preprocessor files copied from the source

Everything is written into a partial folder beside the destination and renamed at the end, so a failed, interrupted
or killed write leaves nothing behind (``partial_dir``), and the rename replaces only an earlier checkpoint, only
when asked (``force``), and never the source, the working directory or a folder holding other files (``atomic_dir``).
A single file is replaced the same way, through a temporary file beside it (``atomic_file``); JSON files are written
by ``write_json``.

jax is imported by the functions that use it, so that the file helpers cost no jax import: the feature extractor
uses them, and so can the torch- and jax-free checkpoint readers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

import numpy as np

from speechseq.errors import CheckpointError, first_line

logger = logging.getLogger("speechseq")

MARKER = "speechseq.json"
FORMAT_VERSION = 1
# files a checkpoint folder may carry besides weights and config: tokenizer, feature extractor, generation defaults
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
              "sentencepiece.bpe.model", "spm.model", "source.spm", "target.spm", "processor_config.json")


def is_speechseq(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


# -- writing folders without losing anything ---------------------------------------------------------------------------
#
# convert / export / save_pretrained write into a hidden partial folder (``partial_dir``) named after the process
# that writes it: removed when the block fails or on SIGINT / SIGTERM, and after kill -9 by the next run that writes
# into the same parent folder, once that process is gone. ``atomic_dir`` then renames the partial folder to the
# destination without replacing anything it did not check (``check_destination``, ``rename_noreplace``).

# The files convert, export and save_pretrained write, and the weight files of transformers' save_pretrained: `--force`
# replaces a folder only when it holds nothing else, so an earlier checkpoint goes and a user's own files never do.
CHECKPOINT_FILES = frozenset({MARKER, "config.json", "model.safetensors", "model.safetensors.index.json",
                              "pytorch_model.bin", "pytorch_model.bin.index.json", *SIDE_FILES})
CHECKPOINT_DIRS = frozenset({"params"})  # the orbax checkpoint of a speechseq checkpoint
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|pytorch_model-\d{5}-of-\d{5}\.bin")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a checkpoint was being written; the exit status is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (/proc/PID/stat field 22, clock ticks since boot): with the pid it names one
    process even after the pid is reused. None when no such process runs; 0 when it runs but /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data.rsplit(b")", 1)[1].split()[19])  # after "pid (comm)" the fields start at the third
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, ValueError, IndexError):
        return 0
    try:  # no /proc (macOS): whether the pid runs at all
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return 0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return ""


_HOST = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:32] or "host"
_BOOT = _boot_id()
# "pid-start-boot-host": a later run on this machine can tell whether the process that made a folder still runs
_OWNER = f"{os.getpid()}-{_start_time(os.getpid()) or 0}-{_BOOT}-{_HOST}"
_TAGGED = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-(?P<start>\d+)-(?P<boot>[0-9a-f]*)-"
                     r"(?P<host>.+)-[0-9a-f]{8}")


def _tagged(parent: Path, name: str, kind: str) -> Path:
    return parent / f".{name}.{kind}-{_OWNER}-{secrets.token_hex(4)}"


def _owner_gone(m: re.Match) -> bool:
    """Whether the process named in a tagged folder's name has ended; another machine's is never guessed at."""
    if m["host"] != _HOST:
        return False
    if m["boot"] and _BOOT and m["boot"] != _BOOT:
        return True  # made before this machine last started
    start = _start_time(int(m["pid"]))
    return start is None or bool(start and int(m["start"]) and start != int(m["start"]))


def remove_stale(parent: Path) -> None:
    """Remove the partial folders in ``parent`` whose process has ended (kill -9, a crash), and put back an earlier
    checkpoint that such a process had moved aside to replace it (or delete it where the new one is in place)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _TAGGED.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False) or not _owner_gone(m):
            continue
        if m["kind"] == "partial":
            shutil.rmtree(entry.path, ignore_errors=True)
            continue
        try:
            rename_noreplace(entry.path, parent / m["name"])
        except FileExistsError:
            _remove_checkpoint(Path(entry.path))
        except OSError:
            pass


# Signals. A SIGINT / SIGTERM handler raises ``Interrupted`` in the main thread; inside ``held()`` (orbax calls, whose
# threads go on writing into the partial folder, and the final renames) it waits until the block ends, since removing
# a folder that other threads still write into leaves it half there and makes them print tracebacks.
_held = 0
_pending: list[int] = []
_partials: set[Path] = set()


def _on_signal(signum: int, frame: Any) -> None:
    if not _held:
        raise Interrupted(signum)
    if _pending:  # a second signal while held: stop now; the next run removes what is left of the partial folder
        for path in list(_partials):
            shutil.rmtree(path, ignore_errors=True)
        os.write(2, f"speechseq: {'interrupted' if signum == signal.SIGINT else 'terminated'} twice: stopped at "
                    "once\n".encode())
        os._exit(128 + signum)
    _pending.append(signum)


class held:
    """Signals that arrive inside the block are raised (as ``Interrupted``) when it ends."""

    def __enter__(self) -> None:
        global _held
        _held += 1

    def __exit__(self, *exc: Any) -> None:
        global _held
        _held -= 1
        if not _held and _pending:
            signum = _pending.pop()
            _pending.clear()
            raise Interrupted(signum)


class partial_dir:
    """A new hidden folder ``parent/.NAME.partial-PID-START-BOOT-HOST-RANDOM`` for this process to write into; it is
    removed when the block ends, unless moved away inside it, and on SIGINT / SIGTERM (exit status 130 / 143 in the
    command). Entering also removes the partial folders in ``parent`` that killed processes left (``remove_stale``).
    Handlers are installed only in the main thread and only over the default ones: an ignored signal stays ignored."""

    def __init__(self, parent: str | os.PathLike, name: str):
        self.parent = Path(parent)
        self.name = name[:64]  # the partial name only has to be recognisable; keeps it within NAME_MAX

    def __enter__(self) -> Path:
        self.handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
                    self.handlers[signum] = signal.signal(signum, _on_signal)
        self.path = _tagged(self.parent, self.name, "partial")
        try:
            remove_stale(self.parent)
            with held():  # made and registered together
                self.path.mkdir()  # mode 0o777 less the umask: the checkpoint is as readable as any new folder
                _partials.add(self.path)
        except BaseException:
            self.__exit__()
            raise
        return self.path

    def __exit__(self, *exc: Any) -> None:
        try:
            with held():  # a signal now waits until the folder is gone
                if os.path.lexists(self.path):
                    shutil.rmtree(self.path, ignore_errors=True)
                _partials.discard(self.path)
        finally:
            self._restore()

    def _restore(self) -> None:
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)


def _within(path: Path, folder: os.stat_result) -> bool:
    """``path`` is ``folder`` or inside it, compared by device and inode along its real ancestors, so that symbolic
    links, bind mounts and case-insensitive file systems cannot hide it."""
    real = Path(os.path.realpath(path))
    for p in (real, *real.parents):
        try:
            if os.path.samestat(os.stat(p), folder):
                return True
        except OSError:
            pass
    return False


def _is_checkpoint_entry(entry: os.DirEntry) -> bool:
    if entry.name in CHECKPOINT_DIRS:
        return entry.is_dir(follow_symlinks=False)
    return (entry.name in CHECKPOINT_FILES or bool(_SHARD.fullmatch(entry.name))) and not entry.is_dir()


def check_destination(dst: Path, force: bool, sources: Iterable[Path] = ()) -> os.stat_result | None:
    """Raise ``CheckpointError`` (one line) unless writing ``dst`` loses nothing. Returns None when ``dst`` does not
    exist, else (``force``) the stat of the earlier checkpoint folder it may replace: never a file or a symbolic link,
    the source, a folder holding the source or inside it, the working directory or a folder holding it, nor a folder
    holding anything but ``CHECKPOINT_FILES`` / ``CHECKPOINT_DIRS``."""
    try:
        st = os.lstat(dst)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot be checked ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{dst}: is a symbolic link, not a checkpoint folder; not replaced")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{dst}: is a file, not a checkpoint folder; not replaced")
    for src in sources:
        src_st = os.stat(src)
        where = ("is" if os.path.samestat(src_st, st) else "holds" if _within(src, st)
                 else "is inside" if _within(dst, src_st) else None)
        if where:
            raise CheckpointError(f"{dst}: {where} the source checkpoint {src}; not replaced, choose another "
                                  "destination")
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = None
    if cwd is not None and _within(cwd, st):
        raise CheckpointError(f"{dst}: is the working directory or holds it; not replaced, choose another destination")
    if not force:
        raise CheckpointError(f"{dst}: already exists; pass --force (force=True) to replace it")
    try:
        with os.scandir(dst) as entries:
            foreign = sorted(e.name for e in entries if not _is_checkpoint_entry(e))
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot be checked ({e.strerror})") from None
    if foreign:
        raise CheckpointError(f"{dst}: holds {foreign[0]}, which is not a checkpoint file; --force replaces only an "
                              "earlier checkpoint, so nothing was replaced")
    return st


def _remove_checkpoint(folder: Path) -> None:
    """Delete a replaced checkpoint: its checkpoint files, then the folder if that empties it (a file that arrived
    after the check stays, with the folder; the next run tries again)."""
    try:
        with os.scandir(folder) as entries:
            for entry in list(entries):
                if _is_checkpoint_entry(entry):
                    shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
        os.rmdir(folder)
    except OSError as e:
        logger.warning("%s: the replaced checkpoint is left here (%s)", folder, e.strerror)


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCL = -100, 1, 4


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then FileExistsError), checked by the kernel in the same step:
    Linux renameat2(RENAME_NOREPLACE), macOS renamex_np(RENAME_EXCL). A check before os.rename leaves a gap another
    process can use, and os.rename of a folder replaces an empty folder there. Where neither call works (another
    system, a file system without the flag) it checks and renames: os.rename fails onto a file or a non-empty folder,
    so at worst an empty folder made in that gap is replaced, and nothing is lost."""
    rc = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if hasattr(libc, "renameat2"):
            rc = libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        elif hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(src), os.fsencode(dst), _RENAME_EXCL)
    except OSError:  # no C library to load (Windows: os.rename never replaces there)
        pass
    if rc == 0:
        return
    if rc is not None:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(src), None, os.fspath(dst))
    os.rename(src, dst)


class atomic_dir:
    """A partial folder (``partial_dir``) that becomes ``dst`` when the block succeeds. ``dst`` is checked
    (``check_destination``, with ``sources`` the checkpoints being read) before the work and again at the end, and
    the rename replaces nothing else: a destination that appeared meanwhile is an error, and with ``force`` only the
    earlier checkpoint just checked is replaced: moved aside, the new folder renamed in (the old one put back if that
    fails), then deleted."""

    def __init__(self, dst: str | os.PathLike, force: bool = False, sources: Iterable[str | os.PathLike] = ()):
        self.dst = Path(os.path.abspath(dst))
        self.force = force
        self.sources = [Path(os.path.abspath(s)) for s in sources]

    def __enter__(self) -> Path:
        check_destination(self.dst, self.force, self.sources)
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"{self.dst.parent}: cannot create the folder ({e.strerror})") from None
        self.partial = partial_dir(self.dst.parent, self.dst.name)
        return self.partial.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                with held():
                    self._publish(self.partial.path)
        finally:
            self.partial.__exit__(exc_type, exc, tb)

    def _publish(self, tmp: Path) -> None:
        dst = self.dst
        appeared = CheckpointError(f"{dst}: appeared while this checkpoint was being written; not replaced")
        if not self.force and os.path.lexists(dst):  # it did not exist at the start
            raise appeared
        checked = check_destination(dst, self.force, self.sources)  # it may have changed while the work ran
        if checked is None:
            try:
                rename_noreplace(tmp, dst)
            except FileExistsError:
                raise appeared from None
            return
        old = _tagged(dst.parent, dst.name, "old")  # tagged: if this process dies here, a later run puts it back
        try:
            rename_noreplace(dst, old)
        except OSError as e:
            raise CheckpointError(f"{dst}: changed while this checkpoint was being written ({e.strerror}); "
                                  "not replaced") from None
        try:
            if not os.path.samestat(os.lstat(old), checked):
                raise CheckpointError(f"{dst}: was replaced by another folder while this checkpoint was being "
                                      "written; not replaced")
            rename_noreplace(tmp, dst)
        except BaseException as e:
            try:
                rename_noreplace(old, dst)
            except OSError:
                raise CheckpointError(f"{dst}: not replaced, and the earlier checkpoint could not be put back: "
                                      f"it is in {old}") from None
            if isinstance(e, OSError):
                raise CheckpointError(f"{dst}: cannot replace it ({e.strerror}); the earlier checkpoint is "
                                      "unchanged") from None
            raise
        _remove_checkpoint(old)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# -- writing single files ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """A file to write ``target``'s new content into (text in UTF-8, or ``binary``) that replaces ``target`` only
    when the block succeeds, so a failure (an exception, an interrupt, a full disk) leaves an earlier ``target`` as
    it was and no temporary file behind.

    The file is a temporary one beside ``target`` (``.NAME.XXXXXXXX.tmp``), given the mode of the file it replaces
    (a new file gets the mode a plain ``open`` would give it), flushed and fsynced, then renamed over ``target``.
    ``target`` itself is replaced: resolve a symbolic link first to write through it, and open a device or a pipe
    directly (a rename would replace it, not write to it). Errors of the file itself are raised as ``OSError``."""
    target = Path(target)
    tmp: Path | None = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    fd = f = None
    try:
        try:
            # mode 0o666 under the umask, as a plain open gives a new file (no process-wide umask change to read it)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            tmp = None  # a file of that name that this call did not make: not ours to remove
            raise
        if target.exists():
            os.chmod(fd, target.stat().st_mode & 0o7777)  # the replaced file's mode
        # closefd=False: only this function closes fd. A signal that raises between open() returning and the name
        # being bound would otherwise drop a file object that closes fd behind our back.
        f = open(fd, "wb", closefd=False) if binary else open(fd, "w", encoding="utf-8", closefd=False)
        yield f
        f.flush()
        os.fsync(fd)  # the data is on disk before the rename makes it the file
        f.close()
        os.replace(tmp, target)
    except BaseException:
        if f is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                f.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def write_json(path: str | os.PathLike, data: Mapping) -> None:
    """Write ``data`` as a JSON file the way transformers' ``to_json_file`` does (2-space indent, sorted keys, ASCII,
    a final newline): every config, marker and side file this package writes goes through here."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


CONCURRENT_GB = 0.25  # bytes in flight while orbax (de)serialises: keeps peak memory near the params' own size


def _limit_gb(sizes: Any) -> float:
    """In-flight bytes for orbax: CONCURRENT_GB, or the largest single array when that is bigger."""
    return max(CONCURRENT_GB, max(sizes, default=0) / 1e9 * 1.01)


def save_params(directory: Path, params: Mapping) -> None:
    """Orbax-save a params pytree under ``directory / "params"``. Pass jax arrays: numpy leaves are copied whole."""
    import jax
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=_limit_gb(x.nbytes for x in jax.tree.leaves(params)))
    with held(), ocp.Checkpointer(handler) as ckptr:
        ckptr.save((directory / "params").absolute(), args=ocp.args.PyTreeSave(params))


def save_params_streaming(directory: Path, batches: Iterable[Mapping[str, Any]]) -> None:
    """Orbax-save params that arrive as batches of flat ``{"a/b/c": array}`` dicts (disjoint paths), writing each batch
    before the next is made, so that only one batch is resident: the same ``params/`` checkpoint as ``save_params``.

    Uses orbax's partial saving; with an orbax that lacks it, the batches are gathered and saved at once.
    """
    from speechseq.checkpoints.table import unflatten

    try:
        from orbax.checkpoint.experimental.v1 import partial
    except ImportError:  # pragma: no cover - older orbax
        merged: dict[str, Any] = {}
        for batch in batches:
            merged.update(batch)
        return save_params(directory, unflatten(merged))
    staging = (directory / "params_partial").absolute()  # orbax mishandles a leading dot here
    for batch in batches:
        tree = unflatten(batch)
        with held():  # orbax's threads write until save returns
            partial.save(staging, tree)
    with held():
        partial.finalize(staging)
    tree_dirs = [d for d in staging.iterdir() if (d / "_METADATA").is_file()]
    if len(tree_dirs) != 1:
        raise CheckpointError(f"{staging}: orbax's partial save left {len(tree_dirs)} pytree folders, expected 1")
    os.replace(tree_dirs[0], directory / "params")
    shutil.copy2(staging / "_CHECKPOINT_METADATA", directory / "params" / "_CHECKPOINT_METADATA")
    shutil.rmtree(staging)


def restore_params(directory: Path, target: Any = None, paths: Iterable[str] | None = None) -> dict:
    """Restore params; ``target`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings) places them on devices.
    ``paths`` ("a/b/c" names, without ``target``) restores only those parameters, as host numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    from speechseq.checkpoints.table import flatten, unflatten

    path = (directory / "params").absolute()
    if not path.is_dir():
        raise CheckpointError(f"{directory}: speechseq checkpoint has no params/ folder")
    tree = _metadata_tree(path)
    if paths is not None:
        flat = flatten(tree)
        tree = unflatten({p: flat[p] for p in paths})
    sizes = (int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(tree))
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=_limit_gb(sizes))
    try:
        with held(), ocp.Checkpointer(handler) as ckptr:
            if target is None:  # host numpy arrays, whatever topology wrote them
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
                if paths is not None:
                    return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                                           partial_restore=True))
                return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{path}: cannot restore the orbax checkpoint ({first_line(e)})") from None


def params_metadata(directory: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of a speechseq checkpoint's params without reading them."""
    from speechseq.checkpoints.table import flatten

    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(_metadata_tree((directory / "params").absolute())).items()}


def _metadata_tree(path: Path) -> Any:
    """The params pytree's array metadata (shape, dtype per leaf) as orbax recorded it."""
    import orbax.checkpoint as ocp

    with held(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        meta = ckptr.metadata(path)
    return getattr(getattr(meta, "item_metadata", meta), "tree", meta)
