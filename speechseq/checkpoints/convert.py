"""Conversions between Hugging Face PyTorch checkpoints and speechseq (orbax) checkpoints, and checkpoint summaries.

All three go through the same weight table (``model.weight_rules``) as ``from_pretrained`` / ``save_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from speechseq.checkpoints import storage
from speechseq.config import SpeechSeq2SeqConfig, config_from_dict, read_json
from speechseq.errors import CheckpointError
from speechseq.hub import resolve
from speechseq.model import weight_rules
from speechseq.checkpoints import table
from speechseq.checkpoints.readers import open_checkpoint, write_safetensors, write_safetensors_streamed

Progress = Callable[[Iterable], Iterable] | None


def _progress(desc: str, enabled: bool) -> Progress:
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit="tensor", leave=False)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None, force: bool = False,
            progress: bool = True) -> table.LoadReport:
    """HF checkpoint (dir or hub id; safetensors or .bin, sharded or not) -> speechseq checkpoint at ``dst``.

    Streams: parameters are read, converted and written in batches of about ``storage.CONCURRENT_GB``, so peak
    memory stays near one batch, not the whole checkpoint. Refuses to leave missing weights uninitialised: every
    weight the config needs must be in the source (checked from names and shapes before anything is written).
    ``dtype`` casts the stored params (default: keep the source dtype).
    """
    path = resolve(src)
    cfg = config_from_dict(read_json(path / "config.json"), str(path / "config.json"))
    rules = weight_rules(cfg)
    cast = None if dtype is None else np.dtype(dtype)
    with storage.atomic_dir(dst, force, sources=[path]) as tmp:
        with open_checkpoint(path) as ckpt:
            found, report = table.plan(rules, {k: ckpt.shape(k) for k in ckpt}, where=str(path))
            if report.missing:
                raise CheckpointError(f"{path}: {len(report.missing)} weights the config needs are missing "
                                      f"(first: {report.missing[0]}); the checkpoint does not match its config.json")
            stored: set[str] = set()

            def nbytes(rule_and_names: tuple[table.Rule, list[str] | None]) -> int:
                names = rule_and_names[1] or ()
                return sum(int(np.prod(ckpt.shape(n))) * (ckpt.dtype(n) if cast is None else cast).itemsize
                           for n in names)

            def batches() -> Iterator[dict]:
                for group in _batched(list(zip(rules, found)), nbytes, "convert", progress):
                    flat, _ = table.load([r for r, _ in group], ckpt, where=str(path), dtype=cast,
                                         place=jax.device_put)
                    stored.update(str(v.dtype) for v in flat.values())
                    yield flat

            storage.save_params_streaming(tmp, batches())
        storage.write_json(tmp / "config.json", cfg.to_dict())
        storage.write_json(tmp / storage.MARKER, {"format": "speechseq", "version": storage.FORMAT_VERSION,
                                                  "dtype": sorted(stored)})
        storage.copy_side_files(path, tmp)
    return report


def export(src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False, progress: bool = True) -> Path:
    """speechseq checkpoint -> Hugging Face layout (config.json, model.safetensors, generation and processor files).

    Streams like ``convert``: parameters are restored in batches of about ``storage.CONCURRENT_GB`` and their HF
    tensors written one by one (a checkpoint whose params mix item sizes is written whole, to keep offsets aligned).
    """
    path = resolve(src)
    if not storage.is_speechseq(path):
        raise CheckpointError(f"{path}: not a speechseq checkpoint (no {storage.MARKER}); "
                              "use `speechseq convert` first, or the folder is already in the Hugging Face layout")
    cfg = config_from_dict(read_json(path / "config.json"), str(path / "config.json"))
    rules = [r for r in weight_rules(cfg) if r.paths]
    meta = storage.params_metadata(path)
    missing = sorted(p for r in rules for p in r.paths if p not in meta)
    if missing:
        raise CheckpointError(f"{path}: params/ lacks {len(missing)} parameters the config needs (first: {missing[0]})")
    out = {"format": "pt"}
    with storage.atomic_dir(dst, force, sources=[path]) as tmp:
        if len({dtype.itemsize for _, dtype in meta.values()}) > 1:
            flat = table.flatten(storage.restore_params(path))
            write_safetensors(tmp / "model.safetensors", table.save(rules, flat, consume=True), out)
        else:
            names = [r.names(i)[0] for r in rules for i in range(r.num_layers)]
            write_safetensors_streamed(tmp / "model.safetensors", names, _exported(path, rules, meta, progress), out)
        storage.write_json(tmp / "config.json", cfg.to_dict())
        storage.copy_side_files(path, tmp)
    return Path(dst)


def _exported(path: Path, rules: list[table.Rule], meta: dict, progress: bool) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors of a speechseq checkpoint, restoring its params in batches of about ``storage.CONCURRENT_GB``."""
    def nbytes(r: table.Rule) -> int:
        return sum(int(np.prod(meta[p][0])) * meta[p][1].itemsize for p in r.paths)

    for group in _batched(rules, nbytes, "export", progress):
        flat = table.flatten(storage.restore_params(path, paths=[p for r in group for p in r.paths]))
        yield from table.save(group, flat, consume=True).items()


def _batched(items: list, nbytes: Callable[[Any], int], desc: str, progress: bool) -> Iterator[list]:
    """``items`` in consecutive groups of at most ``storage.CONCURRENT_GB`` bytes (an item larger than that is a group
    alone), each group closed before the next item would take it past the budget, so that a large parameter is
    handled while little else is resident. The progress bar counts items."""
    wrap = _progress(desc, progress)
    group: list = []
    size, budget = 0, storage.CONCURRENT_GB * 1e9
    for item in (wrap(items) if wrap else items):
        n = nbytes(item)
        if group and size + n > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        yield group


def describe(src: str | os.PathLike) -> dict:
    """What a checkpoint holds, read from names and shapes only: families, sizes, parameter count, dtypes,
    special tokens, and which weights ``from_pretrained`` would initialise freshly."""
    path = resolve(src)
    cfg = config_from_dict(read_json(path / "config.json"), str(path / "config.json"))
    rules = weight_rules(cfg)
    if storage.is_speechseq(path):
        meta = storage.params_metadata(path)
        needed = {p for r in rules for p in r.paths}
        fresh = sorted(needed - set(meta))
        unexpected = sorted(set(meta) - needed)
        count = sum(int(np.prod(s)) for s, _ in meta.values())
        dtypes = sorted({str(d) for _, d in meta.values()})
        fmt = "speechseq (orbax)"
    else:
        with open_checkpoint(path) as ckpt:
            shapes = {k: ckpt.shape(k) for k in ckpt}
            dtypes = sorted({str(ckpt.dtype(k)) for k in ckpt})
            fmt = f"{ckpt.format} ({', '.join(f.name for f in ckpt.files)})"
        _, report = table.plan(rules, shapes, where=str(path))
        fresh, unexpected = report.missing, report.unexpected
        count = sum(int(np.prod(s)) for s in shapes.values())
    return {
        "path": str(path),
        "format": fmt,
        **describe_config(cfg),
        "parameters": count,
        "dtypes": dtypes,
        "special_tokens": {"decoder_start_token_id": cfg.decoder_start_token_id, "pad_token_id": cfg.pad_token_id,
                           "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.decoder.bos_token_id},
        "fresh_weights": fresh,
        "unused_weights": unexpected,
        "side_files": [n for n in storage.SIDE_FILES if (path / n).is_file()],
    }


def describe_config(cfg: SpeechSeq2SeqConfig) -> dict:
    """The model's architecture from its config alone: the ``encoder``, ``decoder`` and ``enc_to_dec_proj`` entries
    of ``describe`` (also what the demo prints for the config it builds)."""
    dec = cfg.decoder
    return {
        "encoder": cfg.encoder.describe(),  # each encoder family says what matters in its own config
        "decoder": f"{dec.model_type}: {dec.num_layers} layers, hidden {dec.hidden_size}, heads {dec.num_heads}, "
                   f"vocab {dec.vocab_size}, {dec.max_positions - dec.position_offset} positions, "
                   f"{'tied' if dec.tie_word_embeddings else 'untied'} output embeddings",
        "enc_to_dec_proj": cfg.has_enc_to_dec_proj,
    }
