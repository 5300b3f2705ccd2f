"""Text metrics of generated output against references: WER and CER (jiwer), BLEU (sacrebleu), over a corpus.

jiwer is a dependency (``speechseq evaluate`` and the demo score with it); sacrebleu (and the training loop's
tensorboardX and matplotlib) are the optional ``train`` extra: they are imported on first use through ``require``,
which turns a missing one into one line naming the install command.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from types import ModuleType
from typing import Sequence

from speechseq.errors import SpeechSeqError

EXTRA = "pip install 'speechseq[train]'"


def require(module: str, purpose: str = "") -> ModuleType:
    """Import an optional dependency of the ``train`` extra, or raise a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpeechSeqError(f"{module.split('.')[0]} is not installed{' (' + purpose + ')' if purpose else ''}; "
                             f"{EXTRA} installs it") from None


_PUNCT = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")  # apostrophes inside words (don't) stay


def normalize(text: str) -> str:
    """Lower-case, punctuation dropped (apostrophes inside words kept), whitespace collapsed: how references and
    hypotheses are compared when ``normalize`` is asked for."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def _prepare(references: Sequence[str], hypotheses: Sequence[str], norm: bool) -> tuple[list[str], list[str]]:
    if len(references) != len(hypotheses):
        raise SpeechSeqError(f"metrics: {len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise SpeechSeqError("metrics: no utterances to score")
    clean = normalize if norm else (lambda t: " ".join(t.split()))
    return [clean(r) for r in references], [clean(h) for h in hypotheses]


def wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = False) -> float:
    """Corpus word error rate: word edits over all reference words (jiwer)."""
    refs, hyps = _prepare(references, hypotheses, normalize)
    return float(require("jiwer", "word error rate").wer(refs, hyps))


def cer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = False) -> float:
    """Corpus character error rate (jiwer)."""
    refs, hyps = _prepare(references, hypotheses, normalize)
    return float(require("jiwer", "character error rate").cer(refs, hyps))


def bleu(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = False) -> float:
    """Corpus BLEU (sacrebleu's default 13a tokenisation), 0-100."""
    refs, hyps = _prepare(references, hypotheses, normalize)
    return float(require("sacrebleu", "BLEU").corpus_bleu(hyps, [refs]).score)


def text_metrics(references: Sequence[str], hypotheses: Sequence[str], *, task: str = "transcribe",
                 normalize: bool = False) -> dict[str, float]:
    """``{"wer", "cer"}``, plus ``"bleu"`` when ``task`` is ``"translate"``."""
    out = {"wer": wer(references, hypotheses, normalize), "cer": cer(references, hypotheses, normalize)}
    if task == "translate":
        out["bleu"] = bleu(references, hypotheses, normalize)
    return out
