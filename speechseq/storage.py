"""speechseq checkpoints: the HF config files beside an orbax checkpoint of the params pytree.

Layout of a speechseq checkpoint directory::

    speechseq.json            {"format": "speechseq", "version": 1, "dtype": "float32"}
    config.json               the Hugging Face speech-encoder-decoder config
    generation_config.json    (when the source had one)
    params/                   orbax checkpoint; restores straight into sharded arrays given a target with shardings
    tokenizer / preprocessor files copied from the source

Everything is written into a temporary folder beside the destination and renamed at the end, so a failed write
leaves nothing behind and an existing destination is replaced only when asked (``force``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from speechseq.errors import CheckpointError

MARKER = "speechseq.json"
FORMAT_VERSION = 1
# files a checkpoint folder may carry besides weights and config: tokenizer, feature extractor, generation defaults
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
              "sentencepiece.bpe.model", "spm.model", "source.spm", "target.spm", "processor_config.json")


def is_speechseq(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


class atomic_dir:
    """Context manager yielding a temporary folder that becomes ``dst`` on success (and vanishes on failure)."""

    def __init__(self, dst: str | os.PathLike, force: bool = False):
        self.dst = Path(dst).absolute()
        self.force = force

    def __enter__(self) -> Path:
        if self.dst.exists() and not self.force:
            raise CheckpointError(f"{self.dst}: already exists; pass --force (force=True) to replace it")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.partial-", dir=self.dst.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(self.tmp, self.dst)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


CONCURRENT_GB = 0.25  # bytes in flight while orbax (de)serialises: keeps peak memory near the params' own size


def _limit_gb(sizes: Any) -> float:
    """In-flight bytes for orbax: CONCURRENT_GB, or the largest single array when that is bigger."""
    return max(CONCURRENT_GB, max(sizes, default=0) / 1e9 * 1.01)


def save_params(directory: Path, params: Mapping) -> None:
    """Orbax-save a params pytree under ``directory / "params"``. Pass jax arrays: numpy leaves are copied whole."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=_limit_gb(x.nbytes for x in jax.tree.leaves(params)))
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save((directory / "params").absolute(), args=ocp.args.PyTreeSave(params))


def save_params_streaming(directory: Path, batches: Iterable[Mapping[str, Any]]) -> None:
    """Orbax-save params that arrive as batches of flat ``{"a/b/c": array}`` dicts (disjoint paths), writing each batch
    before the next is made, so that only one batch is resident: the same ``params/`` checkpoint as ``save_params``.

    Uses orbax's partial saving; with an orbax that lacks it, the batches are gathered and saved at once.
    """
    from speechseq.weights.table import unflatten

    try:
        from orbax.checkpoint.experimental.v1 import partial
    except ImportError:  # pragma: no cover - older orbax
        merged: dict[str, Any] = {}
        for batch in batches:
            merged.update(batch)
        return save_params(directory, unflatten(merged))
    staging = (directory / "params_partial").absolute()  # orbax mishandles a leading dot here
    for batch in batches:
        partial.save(staging, unflatten(batch))
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
    import orbax.checkpoint as ocp

    from speechseq.weights.table import flatten, unflatten

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
        with ocp.Checkpointer(handler) as ckptr:
            if target is None:  # host numpy arrays, whatever topology wrote them
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
                if paths is not None:
                    return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                                           partial_restore=True))
                return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except (ValueError, FileNotFoundError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot restore the orbax checkpoint ({first})") from None


def params_metadata(directory: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of a speechseq checkpoint's params without reading them."""
    from speechseq.weights.table import flatten

    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(_metadata_tree((directory / "params").absolute())).items()}


def _metadata_tree(path: Path) -> Any:
    """The params pytree's array metadata (shape, dtype per leaf) as orbax recorded it."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        meta = ckptr.metadata(path)
    return getattr(getattr(meta, "item_metadata", meta), "tree", meta)
