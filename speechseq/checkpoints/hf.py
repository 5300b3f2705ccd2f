"""Hugging Face checkpoints <-> speechseq params, through the weight tables (``table.load`` / ``table.save``).

Every conversion here goes through one table per family, so import and export cannot drift apart.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from speechseq.checkpoints import storage
from speechseq.config import SpeechSeq2SeqConfig
from speechseq.errors import CheckpointError
from speechseq.registry import Family
from speechseq.checkpoints import table
from speechseq.checkpoints.readers import write_safetensors

logger = logging.getLogger("speechseq")


def init_std(cfg: SpeechSeq2SeqConfig) -> float:
    hf = cfg.decoder.hf
    return float(hf.get("initializer_range", hf.get("init_std", 0.02)))


def to_tree(flat: Mapping[str, np.ndarray]) -> dict:
    """Flat numpy params -> nested pytree of float32 jax arrays."""
    return table.unflatten({k: jnp.asarray(v, dtype=jnp.float32) for k, v in flat.items()})


def to_flat_numpy(params: Mapping) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in table.flatten(params).items()}


def log_report(report: table.LoadReport, where: str, fresh_note: str = "") -> None:
    """Report missing and unexpected weights the way transformers does (a warning, not an error)."""
    if report.unexpected:
        logger.warning("%s: %d weights were not used: %s", where, len(report.unexpected), _short(report.unexpected))
    if report.missing:
        logger.warning("%s: %d weights were not in the checkpoint and are newly initialized%s: %s", where,
                       len(report.missing), fresh_note, _short(report.missing))


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def load_part(fam: Family, cfg: Any, tensors: Mapping[str, np.ndarray], where: str,
              assemble: Callable | None = None) -> tuple[dict, table.LoadReport]:
    """Load a standalone encoder or decoder checkpoint, finding where its base model sits (``wav2vec2.``, ``bert.``).

    Returns flat params relative to the part and the report. ``assemble``: as ``table.load``'s.
    """
    keys = set(tensors.keys())
    best = max(fam.prefixes, key=lambda base: sum(
        any(n in keys for n in r.names(0)) for r in table.prefixed(fam.weight_rules(cfg), "", "", base=base)))
    rules = table.prefixed(fam.weight_rules(cfg), "", "", base=best)
    return table.load(rules, tensors, where=where, assemble=assemble)


def save_hf(directory: str | os.PathLike, config: dict, tensors: Mapping[str, np.ndarray],
            extra_json: Mapping[str, dict] | None = None) -> Path:
    """Write config.json + model.safetensors (+ other JSON files) into ``directory`` atomically per file.

    Files are written into a partial folder inside ``directory`` (``storage.partial_dir``: removed on failure, on
    SIGINT / SIGTERM, and by a later save after kill -9), then moved in one by one, so an interrupted save never leaves
    a half-written file; other files already in ``directory`` are kept, as in transformers' ``save_pretrained``.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with storage.partial_dir(out, "speechseq-save") as tmp:
        write_safetensors(tmp / "model.safetensors", dict(tensors), {"format": "pt"})
        files = {"config.json": config, **(extra_json or {})}
        for name, data in files.items():
            storage.write_json(tmp / name, data)
        with storage.held():  # a signal waits until all files are in
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
    return out
