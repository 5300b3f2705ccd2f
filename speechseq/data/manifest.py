"""Training manifests: (audio file, transcript) rows from JSONL, CSV, TSV, or a folder of audio + ``.txt`` pairs.

A manifest is read whole into ``Example`` rows; nothing is opened but the manifest itself (the ``Loader`` checks the
audio files). Relative audio paths resolve against the manifest's folder. A row that cannot be parsed (malformed JSON,
missing field, wrong type, no transcript file) raises a one-line ``InputError`` naming ``file:line``, or, with
``on_bad="skip"``, stays in the list as an ``Example`` whose ``problem`` says why, so that the ``Loader`` counts it
with the other skipped rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from speechseq.errors import InputError, read_text

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")
# field names other tools write (NeMo: audio_filepath; Common Voice: path, sentence), tried when the defaults are absent
AUDIO_KEYS = ("audio", "path", "file", "audio_filepath")
TEXT_KEYS = ("text", "sentence", "transcript", "transcription")
ON_BAD = ("skip", "raise")


@dataclass(frozen=True)
class Example:
    """One manifest row. ``audio`` is an absolute path; ``where`` ("file:line", or the audio path for a folder)
    names the row in messages; ``problem`` is set only for a row ``read_manifest(on_bad="skip")`` could not parse."""

    id: str
    audio: str
    text: str
    where: str = ""
    problem: str | None = None


def check_on_bad(on_bad: str) -> str:
    if on_bad not in ON_BAD:
        raise InputError(f"on_bad: expected 'skip' or 'raise', got {on_bad!r}")
    return on_bad


def read_manifest(path: str | os.PathLike, *, audio_key: str = "audio", text_key: str = "text", id_key: str = "id",
                  on_bad: str = "raise") -> list[Example]:
    """The rows of a manifest, in file order.

    - ``.jsonl`` / ``.json``: one JSON object a line (blank lines ignored) with ``audio_key`` and ``text_key``
      (when left at their defaults, also ``path`` / ``file`` / ``audio_filepath`` and ``sentence`` / ``transcript``
      / ``transcription``) and optionally ``id_key``;
    - ``.csv`` / ``.tsv``: a header row naming those columns (TSV unquoted, as Common Voice writes it);
    - a folder: every audio file under it (sorted, recursively) with the same-named ``.txt`` beside it.

    ``id`` is the row's ``id_key`` field, else the audio path as written (relative to the folder for a folder).
    """
    check_on_bad(on_bad)
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_folder(path, on_bad)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise InputError(f"{path}: unknown manifest type {suffix!r} (expected .jsonl, .csv, .tsv or a folder)")
    text = read_text(path)
    rows = _json_rows(path, text) if suffix in (".jsonl", ".json") else _table_rows(path, text, suffix == ".tsv")
    out = []
    for line, row in rows:
        where = f"{path}:{line}"
        try:
            out.append(_example(row, path.parent, where, audio_key, text_key, id_key))
        except _BadRow as e:
            if on_bad == "raise":
                raise InputError(f"{where}: {e}") from None
            out.append(Example(id=where, audio="", text="", where=where, problem=str(e)))
    return out


class _BadRow(Exception):
    """A row that cannot be parsed; its message is the reason."""


def _json_rows(path: Path, text: str) -> list[tuple[int, object]]:
    rows: list[tuple[int, object]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((n, _BadRow(f"malformed JSON ({e.msg} at column {e.colno})")))
    return rows


def _table_rows(path: Path, text: str, tsv: bool) -> list[tuple[int, object]]:
    options = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else {}
    reader = csv.DictReader(io.StringIO(text, newline=""), **options)
    if not reader.fieldnames:
        raise InputError(f"{path}: empty; expected a header row naming the audio and text columns")
    rows: list[tuple[int, object]] = []
    try:
        for row in reader:
            if None in row or None in row.values():  # DictReader's marks of extra / missing fields
                row = _BadRow(f"{'more' if None in row else 'fewer'} fields than the header's "
                              f"{len(reader.fieldnames)}")
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed {'TSV' if tsv else 'CSV'} ({e})") from None
    return rows


def _field(row: dict, key: str, defaults: tuple[str, ...], what: str) -> object:
    for k in (key,) + (defaults[1:] if key == defaults[0] else ()):
        if k in row:
            return row[k]
    raise _BadRow(f"no {what} field {key!r}" + (f" (nor {', '.join(map(repr, defaults[1:]))})"
                                                 if key == defaults[0] else ""))


def _example(row: object, folder: Path, where: str, audio_key: str, text_key: str, id_key: str) -> Example:
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    audio = _field(row, audio_key, AUDIO_KEYS, "audio")
    if not isinstance(audio, str) or not audio.strip():
        raise _BadRow(f"audio should be a file path (a non-empty string), got {audio!r:.80}")
    text = _field(row, text_key, TEXT_KEYS, "text")
    if not isinstance(text, str):
        raise _BadRow(f"text should be a string, got {text!r:.80}")
    ident = row.get(id_key, audio)
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise _BadRow(f"{id_key!r} should be a string or integer, got {ident!r:.80}")
    file = Path(audio).expanduser()
    file = file if file.is_absolute() else folder / file
    return Example(id=str(ident), audio=os.path.abspath(file), text=text, where=where)


def _read_folder(folder: Path, on_bad: str) -> list[Example]:
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS and f.is_file())
    if not files:
        raise InputError(f"{folder}: folder holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    out = []
    for f in files:
        ident = str(f.relative_to(folder))
        transcript = f.with_suffix(".txt")
        try:
            text = transcript.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = (f"no transcript {transcript.name} beside it" if isinstance(e, FileNotFoundError) else
                      f"cannot read transcript {transcript.name} "
                      f"({'not UTF-8' if isinstance(e, UnicodeDecodeError) else e.strerror})")
            if on_bad == "raise":
                raise InputError(f"{f}: {reason}") from None
            out.append(Example(id=ident, audio=os.path.abspath(f), text="", where=str(f), problem=reason))
            continue
        out.append(Example(id=ident, audio=os.path.abspath(f), text=text, where=str(f)))
    return out
