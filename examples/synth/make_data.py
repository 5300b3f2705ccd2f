"""Make an English speech recognition data set offline: real sentences spoken by espeak-ng (issue 28).

Sentences come from Debian's ``fortunes`` (quotations, proverbs, jokes; ~15,000 entries in
/usr/share/games/fortunes), split into sentences and normalised for speech recognition: lowercase, letters,
apostrophes inside words and single spaces only; sentences with digits, acronyms, abbreviations, initials, colons or
symbols are dropped rather than guessed at (so the text is what espeak-ng says), and so are sentences outside 3-16
words / 80 characters and those with a word found in no other sentence (--min-word-sentences). The rest are
deduplicated and shuffled by sentence into disjoint sets, so no test sentence occurs in training: ``test`` and
``test_voice`` first, then ``valid``, then ``train`` (the held-out sets do not change with --train).
Training also gets --generated sentences made by a word bigram chain over its own sentences (`generate`), --words
utterances of common English words in random order (`word_lists`: the most frequent words of the ``wordfreq``
package that Debian's ``wamerican`` dictionary spells so, far more words than the fortunes hold), and --pairs
utterances of two sentences spoken one after the other (`pair`); none of them changes the held-out sets.

espeak-ng speaks each sentence with a voice drawn from ``TRAIN_VOICES`` x ``TRAIN_VARIANTS`` (accents x timbres), a
speed and a pitch; ``test_voice`` uses the variant ``HELD_OUT_VARIANT``, which nothing else uses. Each waveform is
resampled to 16 kHz (speechseq.audio.load_audio), given a random gain, up to 0.25 s of leading silence and light
white noise, and written as mono float32 WAV. Everything follows from --seed (same espeak-ng version, same files).

Outputs in --out (default data/synth; it must not exist yet, and appears whole or not at all):

    train.jsonl valid.jsonl test.jsonl test_voice.jsonl   one line per utterance:
        {"id", "audio" (path relative to the manifest), "text", "voice" (espeak-ng's -v), "duration" (seconds)}
    train/ valid/ test/ test_voice/                       the WAV files
    tokenizer/                                            BPE learnt from the training sentences (make_tokenizer.py;
                                                          --bpe 0: one token per character)
    meta.json                                             settings, espeak-ng version, counts and statistics

    python examples/synth/make_data.py [--out data/synth] [--train 15000] [--generated 70000] [--mid-start 0.5]
        [--words 0] [--pairs 15000] [--clean 0.3] [--seed 0] [--jobs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_tokenizer beside this file, however it is run

from make_tokenizer import save_tokenizer  # noqa: E402

from speechseq.audio import load_audio  # noqa: E402
from speechseq.checkpoints.storage import atomic_dir, atomic_file, write_json  # noqa: E402
from speechseq.errors import InputError, SpeechSeqError  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
# fortune files left out: pictures, non-English text, code, and ethnic jokes
SKIP_FILES = frozenset({"ascii-art", "translate-me", "perl", "ethnic"})
DICTIONARY = Path("/usr/share/dict/american-english")  # Debian's wamerican
INSTALL = {"espeak-ng": "sudo apt-get install espeak-ng", "fortunes": "sudo apt-get install fortunes",
           "wamerican": "sudo apt-get install wamerican", "wordfreq": "pip install wordfreq"}

# espeak-ng voices (accents) and variants (timbres: "" is the voice's own); mbrola voices need another package.
# British English is "en": espeak-ng 1.51 drops the variant of "en-gb+m3" without a word (test_synth_data checks
# that every voice and variant here changes the sound).
# Two accents: each of espeak-ng's English accents spells sounds its own way (Scottish, Caribbean, regional
# British...), and with eight of them the recogniser had learnt each far less in the two hours its training gets.
TRAIN_VOICES = ("en-us", "en")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f4", "f5")
HELD_OUT_VARIANT = "f3"  # a female timbre with its own formants; only test_voice uses it
SPEED_WPM = (135, 185)  # espeak-ng -s, words per minute (its default is 175)
PITCH = (25, 75)  # espeak-ng -p, 0-99 (default 50)
PEAK_DB = (-20.0, -1.0)  # gain: the waveform's peak is set to this level, in dB of full scale
SNR_DB = (20.0, 40.0)  # light white noise: this many dB below the speech's power
LEAD_SECONDS = (0.0, 0.25)  # silence (then noise) before the speech: espeak-ng starts speaking at once
SAMPLING_RATE = 16000

MIN_WORDS, MAX_WORDS, MAX_CHARS = 3, 16, 80  # 80 characters at 135 wpm are at most ~6 s of speech
PAIR_MAX_CHARS = 84  # two sentences and espeak-ng's pause between them within train.toml's 7 s at 135 wpm
SPLITS = ("test", "test_voice", "valid", "train")  # the order sentences are dealt in
COMMON_WORDS = 50000  # word_lists draws from wordfreq's this many most frequent English words (32,794 kept)
WORD_EXPONENT = 0.5  # ... each with probability proportional to its frequency to this power
WORD_LIST_MAX_WORDS = 12

ABBREVIATIONS = frozenset("""mr mrs ms dr st jr sr vs etc prof gen col capt lt sgt rev hon inc ltd co corp no vol
fig mt ft pp ca cf viz approx dept univ assn bros""".split())
_RAW_OK = re.compile(r"[A-Za-z \t\n.,;!?'\"()`-]+")  # anything else (digits, :, /, &, $, ...) drops the sentence
_SENTENCE_END = re.compile(r"[.!?][\"')`]*(\s+)(?=[^a-z])")  # the space after ., ! or ? (and closing quotes)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


# ---------------------------------------------------------------------------------------------------- sentences
def read_fortunes(directory: Path = FORTUNES) -> list[str]:
    """The text of every fortune in ``directory`` (files in name order, ``SKIP_FILES`` left out), each one string
    with its lines joined by spaces and its attribution (from a line starting with ``--``) dropped."""
    texts = []
    for path in sorted(directory.iterdir()):
        if "." in path.name or path.name in SKIP_FILES or not path.is_file():
            continue  # *.dat indexes and *.u8 links
        raw = path.read_bytes().decode("utf-8", errors="replace")  # a few are Latin-1: those sentences are dropped
        for fortune in re.split(r"^%\n", raw, flags=re.M):
            lines = []
            for line in fortune.splitlines():
                if line.lstrip().startswith("--"):
                    break
                lines.append(line.strip())
            text = " ".join(lines).strip()
            if text:
                texts.append(text)
    return texts


def split_sentences(text: str) -> list[str]:
    """``text`` cut after ``.``, ``!`` or ``?`` (and closing quotes) where the next word does not start in lowercase,
    except after an abbreviation or an initial."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        pieces.append(text[start:m.start(1)])
        start = m.end(1)
    pieces.append(text[start:])
    out: list[str] = []
    for piece in pieces:
        if out and _ends_with_abbreviation(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return [p.strip() for p in out if p.strip()]


def _ends_with_abbreviation(piece: str) -> bool:
    last = piece.rstrip("\"')`").split()[-1] if piece.split() else ""
    word = last.rstrip(".").lstrip("\"'(`").lower()
    return last.endswith(".") and (word in ABBREVIATIONS or len(word) == 1 or "." in word)


def normalise(sentence: str) -> str | None:
    """``sentence`` as the data set writes it (lowercase words of letters and inner apostrophes, one space apart),
    or None when it would not say what espeak-ng says or is out of bounds (see the module docstring)."""
    s = sentence.strip()
    if not _RAW_OK.fullmatch(s) or not re.match(r"[\"'(`]*[A-Z]", s) or not re.search(r"[.!?][\"')`]*$", s):
        return None  # a symbol or digit, or not a whole sentence (no capital at the start, no full stop at the end)
    for raw in s.split():
        core = raw.strip("\"'()`.,;!?-")
        if re.search(r"[A-Z]", core[1:]) or re.search(r"[a-zA-Z]\.[a-zA-Z]", raw):
            return None  # an acronym (IBM), shouting, CamelCase, or e.g. / U.S.
        if core.lower() in ABBREVIATIONS and raw.rstrip("\"')`").endswith("."):
            return None
    s = re.sub(r"[-]+", " ", s.lower())  # well-known -> well known: espeak-ng says the two words
    s = re.sub(r"[.,;!?\"()`]", " ", s)
    words = [w.strip("'") for w in s.split()]
    words = [w for w in words if w]
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    if not all(_WORD.fullmatch(w) and (len(w) > 1 or w in ("a", "i")) for w in words):
        return None  # '' or a stray letter ("x" is said "ex")
    text = " ".join(words)
    return text if len(text) <= MAX_CHARS else None


def load_sentences(directory: Path = FORTUNES, min_word_sentences: int = 2) -> list[str]:
    """Every distinct normalised sentence of the fortunes in ``directory`` whose every word occurs in at least
    ``min_word_sentences`` of them, sorted. 2 drops typos, nonce words and most names (13,384 sentences and 12,472
    words -> 8,547 and 5,351), so that fewer test words are missing from training (3.4% of the test sets' words with
    6,000 training sentences, against 8.8% with 1; 1.6% with 3, which leaves 6,615 sentences and 3,628 words)."""
    found = {normalise(s) for text in read_fortunes(directory) for s in split_sentences(text)}
    found.discard(None)
    counts = Counter(w for s in found for w in set(s.split()))
    return sorted(s for s in found if all(counts[w] >= min_word_sentences for w in s.split()))


def deal(sentences: list[str], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Shuffle ``sentences`` (a seeded permutation) and deal them to the sets in ``SPLITS`` order, ``sizes[name]``
    each; train gets at most all that remain (its utterances cycle over them with new voices)."""
    order = np.random.default_rng([seed, 0]).permutation(len(sentences))
    need = sum(sizes[s] for s in SPLITS if s != "train") + 1
    if len(sentences) < need:
        raise InputError(f"only {len(sentences)} distinct sentences; the held-out sets and one training sentence "
                         f"need {need}")
    out, start = {}, 0
    for name in SPLITS:
        stop = len(order) if name == "train" else start + sizes[name]
        out[name] = [sentences[i] for i in order[start:min(stop, start + sizes[name])]]
        start = stop
    return out


def generate(train: list[str], count: int, seed: int, avoid: set[str] = frozenset(), mid_start: float = 0.0
             ) -> list[str]:
    """``count`` distinct new sentences made by a word bigram chain over the ``train`` sentences: the first word as a
    training sentence starts, each next word (or the end) drawn as often as it follows the word before in training,
    kept when it has ``MIN_WORDS``..``MAX_WORDS`` words and at most ``MAX_CHARS`` characters and is neither a
    training sentence nor in ``avoid``. Every word and every pair of neighbouring words occurs in training, but the
    sentences do not: a recogniser trained on them cannot transcribe by completing a sentence it remembers, so it
    has to listen (on the default data set the fortunes alone gave 3.5% CER on training sentences and 50% on
    unseen ones). A ``mid_start`` share of the chains starts instead at any word of the training text, every
    different word alike: the fortunes begin with only ~1,200 different words, and a recogniser that never heard an
    utterance begin with "speech" misspells it there. With ``mid_start`` 0 every chain starts as a training
    sentence does, and the draws are those of the data set made before ``--mid-start``."""
    follow: dict[str, Counter] = {}
    for sentence in train:
        words = ["<s>", *sentence.split(), "</s>"]
        for a, b in zip(words, words[1:]):
            follow.setdefault(a, Counter())[b] += 1
    table = {a: (list(c), np.cumsum(list(c.values()))) for a, c in sorted(follow.items())}
    vocabulary = sorted({w for sentence in train for w in sentence.split()})
    rng = np.random.default_rng([seed, 3])
    seen, out = set(train) | set(avoid), []
    for _ in range(count * 50):
        if len(out) == count:
            break
        words, word = [], "<s>"
        if mid_start and rng.random() < mid_start:
            word = vocabulary[int(rng.integers(len(vocabulary)))]
            words.append(word)
        while len(words) <= MAX_WORDS:
            options, cum = table[word]
            word = options[int(np.searchsorted(cum, rng.integers(cum[-1]), side="right"))]
            if word == "</s>":
                break
            words.append(word)
        text = " ".join(words)
        if MIN_WORDS <= len(words) <= MAX_WORDS and len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < count:
        raise InputError(f"the bigram chain gave {len(out)} distinct new sentences, fewer than --generated {count}")
    return out


def load_common_words(dictionary: Path = DICTIONARY, top: int = COMMON_WORDS) -> tuple[list[str], np.ndarray]:
    """wordfreq's ``top`` most frequent English words that ``dictionary`` (one word a line) holds as they are, in
    the data set's form (lowercase letters, inner apostrophes; no one-letter word but "a" and "i"), most frequent
    first, and their frequencies [V]. The dictionary keeps out what espeak-ng would spell or misread: names written
    in lowercase, abbreviations (``tv``, ``ok``), slang and fragments of words."""
    from wordfreq import top_n_list, word_frequency

    known = set(dictionary.read_text(encoding="utf-8", errors="replace").split())
    words = [w for w in top_n_list("en", top)
             if _WORD.fullmatch(w) and (len(w) > 1 or w in ("a", "i")) and w in known]
    return words, np.array([word_frequency(w, "en") for w in words])


def word_lists(words: list[str], frequencies: np.ndarray, count: int, seed: int,
               exponent: float = WORD_EXPONENT) -> list[str]:
    """``count`` texts of ``MIN_WORDS``..``WORD_LIST_MAX_WORDS`` words (the length drawn uniformly, a text over
    ``MAX_CHARS`` characters drawn again), each word drawn independently from ``words`` with probability
    proportional to ``frequencies ** exponent``. No grammar binds them, so the recogniser learns to spell what it
    hears over a vocabulary far wider than the fortunes' (5,351 words): 20,000 lists hold ~28,000 distinct words, a
    common word such as "text" ~17 times (the fortunes and their chains give it 26 times in 100,000 utterances), and
    sentence patterns cannot stand in for listening."""
    weights = np.asarray(frequencies, dtype=np.float64) ** exponent
    cum = np.cumsum(weights / weights.sum())
    rng = np.random.default_rng([seed, 5])
    out: list[str] = []
    for _ in range(count * 50):
        if len(out) == count:
            break
        n = int(rng.integers(MIN_WORDS, WORD_LIST_MAX_WORDS + 1))
        picks = np.minimum(np.searchsorted(cum, rng.random(n), side="right"), len(words) - 1)
        text = " ".join(words[i] for i in picks)
        if len(text) <= MAX_CHARS:
            out.append(text)
    if len(out) < count:
        raise InputError(f"only {len(out)} word lists fit in {MAX_CHARS} characters, fewer than --words {count}")
    return out


def pair(sentences: list[str], count: int, seed: int, max_chars: int = PAIR_MAX_CHARS) -> list[str]:
    """``count`` two-sentence texts: random pairs of ``sentences`` whose joined text has at most ``max_chars``
    characters, each written with a full stop between the two (`synthesize` speaks it as two sentences, with
    espeak-ng's pause between them; the transcript has neither). A recogniser trained on single sentences alone
    stops or invents after the first sentence of a longer clip (what long audio cut at pauses gives)."""
    rng = np.random.default_rng([seed, 4])
    out = []
    for _ in range(count * 50):
        if len(out) == count:
            break
        a, b = (sentences[i] for i in rng.integers(len(sentences), size=2))
        if a != b and len(a) + 1 + len(b) <= max_chars:
            out.append(f"{a}. {b}")
    if len(out) < count:
        raise InputError(f"only {len(out)} sentence pairs fit in {max_chars} characters, fewer than --pairs {count}")
    return out


# ---------------------------------------------------------------------------------------------------- speech
@dataclass(frozen=True)
class Utterance:
    id: str
    split: str
    text: str  # what espeak-ng says: the transcript, or two of them joined by ". " (`pair`)
    voice: str  # espeak-ng -v, e.g. "en-us+m3"
    speed: int
    pitch: int
    seed: tuple[int, ...]  # of the noise and gain


def plan(sets: dict[str, list[str]], sizes: dict[str, int], seed: int,
         generated: list[str] = (), pairs: list[str] = (), words: list[str] = ()) -> list[Utterance]:
    """One `Utterance` per line of every manifest: the set's sentences in order (train cycling over its sentences
    when ``sizes["train"]`` is larger, then the ``generated`` sentences, the ``words`` lists, then the ``pairs``),
    each with a voice, speed and pitch drawn from its own seeded generator."""
    utterances = []
    for k, name in enumerate(SPLITS):
        rng = np.random.default_rng([seed, 1, k])
        variants = (HELD_OUT_VARIANT,) if name == "test_voice" else TRAIN_VARIANTS
        texts = [sets[name][i % len(sets[name])] for i in range(sizes[name])]
        texts += [*generated, *words, *pairs] if name == "train" else []
        for i, text in enumerate(texts):
            voice = TRAIN_VOICES[rng.integers(len(TRAIN_VOICES))]
            variant = variants[rng.integers(len(variants))]
            utterances.append(Utterance(
                id=f"{name}-{i:05d}", split=name, text=text,
                voice=f"{voice}+{variant}" if variant else voice,
                speed=int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1)),
                pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)), seed=(seed, 2, k, i)))
    return utterances


def synthesize(u: Utterance, folder: Path, scratch: Path, clean: float = 0.0) -> dict:
    """Speak ``u`` with espeak-ng, resample to 16 kHz, add gain and noise (none for a share ``clean`` of the training
    utterances), write ``folder/<split>/<id>.wav`` (float32) and return its manifest line."""
    raw = scratch / f"{u.id}.wav"
    cmd = ["espeak-ng", "-v", u.voice, "-s", str(u.speed), "-p", str(u.pitch), "-w", str(raw), u.text]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not raw.is_file():
        raise InputError(f"espeak-ng failed on {u.id} ({' '.join(cmd[:7])}): {done.stderr.strip()[:200]}")
    audio = load_audio(raw, SAMPLING_RATE).astype(np.float64)  # [N]; espeak-ng writes 22,050 Hz
    raw.unlink()
    rng = np.random.default_rng(u.seed)
    peak_db, snr_db = rng.uniform(*PEAK_DB), rng.uniform(*SNR_DB)
    audio *= 10 ** (peak_db / 20) / max(np.abs(audio).max(), 1e-9)
    audio = np.concatenate([np.zeros(int(rng.uniform(*LEAD_SECONDS) * SAMPLING_RATE)), audio])
    power = np.mean(audio ** 2)
    noise = rng.standard_normal(audio.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    # a clean utterance (digital silence around the speech, as espeak-ng writes it) from a generator of its own, so
    # that the other utterances' bytes do not depend on the share of clean ones
    if u.split != "train" or np.random.default_rng((*u.seed, 1)).uniform() >= clean:
        audio += noise
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    rel = f"{u.split}/{u.id}.wav"
    (folder / rel).write_bytes(float_wav(audio, SAMPLING_RATE))  # ``folder`` is the partial folder: no fsync each
    return {"id": u.id, "audio": rel, "text": u.text.replace(". ", " "), "voice": u.voice,
            "duration": round(len(audio) / SAMPLING_RATE, 4)}


def float_wav(audio: np.ndarray, rate: int) -> bytes:
    """A mono 32-bit float WAV file holding ``audio`` [N]: RIFF header, ``fmt`` (IEEE float), ``fact`` and ``data``
    chunks. Written here rather than by soundfile because libsndfile adds a PEAK chunk stamped with the time of
    writing, and the same seed should give the same bytes."""
    data = np.asarray(audio, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)  # WAVE_FORMAT_IEEE_FLOAT, 1 channel, as libsndfile
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, len(audio))
            + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def espeak_version() -> str:
    """espeak-ng's ``--version`` line (it names the version and data folder)."""
    return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()


def missing_tools(fortunes: Path, dictionary: Path | None = DICTIONARY) -> list[str]:
    """What this script needs and does not find, as `INSTALL` names it; ``dictionary``: None when no word lists
    are made (then neither it nor wordfreq is needed)."""
    missing = [] if shutil.which("espeak-ng") else ["espeak-ng"]
    missing += [] if fortunes.is_dir() and any(fortunes.iterdir()) else ["fortunes"]
    if dictionary is not None:
        missing += [] if dictionary.is_file() else ["wamerican"]
        missing += [] if importlib.util.find_spec("wordfreq") else ["wordfreq"]
    return missing


# ---------------------------------------------------------------------------------------------------- main
def make_dataset(out: Path, sizes: dict[str, int], seed: int = 0, jobs: int = 2, min_word_sentences: int = 2,
                 fortunes: Path = FORTUNES, progress: bool = True, bpe: int = 500, generated: int = 0,
                 clean: float = 0.0, pairs: int = 0, words: int = 0, dictionary: Path = DICTIONARY,
                 mid_start: float = 0.0) -> dict:
    """Write the data set described in the module docstring into ``out`` (which must not exist); returns meta.json's
    content. ``bpe``: the tokenizer's vocabulary size (0: characters); ``generated``: training utterances of
    sentences made by `generate` after the ``sizes["train"]`` fortunes; ``pairs``: training utterances of two
    sentences (`pair`: of the training fortunes and generated ones) after those; ``words``: training utterances of
    `word_lists` between the generated ones and the pairs (their words from ``dictionary`` and wordfreq);
    ``mid_start``: `generate`'s share of chains that start at any word."""
    start = time.monotonic()
    sentences = load_sentences(fortunes, min_word_sentences)
    sets = deal(sentences, sizes, seed)
    held_out = {s for name in SPLITS if name != "train" for s in sets[name]}
    made = generate(sets["train"], generated, seed, held_out, mid_start) if generated else []
    lists = word_lists(*load_common_words(dictionary), words, seed) if words else []
    utterances = plan(sets, sizes, seed, made, pair(sets["train"] + made, pairs, seed) if pairs else [], lists)
    with atomic_dir(out) as tmp:
        scratch = tmp / ".espeak"
        for name in (*SPLITS, scratch.name):
            (tmp / name).mkdir()
        rows: dict[str, list[dict]] = {name: [] for name in SPLITS}
        pool = ThreadPoolExecutor(jobs)  # threads: the work is espeak-ng processes and numpy, GIL released
        try:
            done = pool.map(lambda u: synthesize(u, tmp, scratch, clean), utterances)  # in order
            for n, (u, row) in enumerate(zip(utterances, done), 1):
                rows[u.split].append(row)
                if progress and (n % 500 == 0 or n == len(utterances)):
                    print(f"{n}/{len(utterances)} utterances, {time.monotonic() - start:.0f} s", file=sys.stderr,
                          flush=True)
        finally:  # on an error or Ctrl-C, drop the queued utterances instead of speaking them all first
            pool.shutdown(cancel_futures=True)
        scratch.rmdir()
        for name in SPLITS:
            with atomic_file(tmp / f"{name}.jsonl") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[name])
        save_tokenizer(tmp / "tokenizer", [r["text"] for r in rows["train"]] if bpe else None, bpe)
        meta = _meta(rows, sentences, sizes, seed, jobs, min_word_sentences, fortunes, time.monotonic() - start)
        meta["tokenizer"] = f"bpe {bpe}" if bpe else "characters"
        meta["generated"] = generated
        meta["clean"] = clean
        meta["pairs"] = pairs
        meta["words"] = words
        if mid_start:
            meta["mid_start"] = mid_start
        if words:
            from importlib.metadata import version

            meta["word_source"] = {"wordfreq": version("wordfreq"), "dictionary": str(dictionary),
                                   "top": COMMON_WORDS, "exponent": WORD_EXPONENT,
                                   "distinct_words": len({w for t in lists for w in t.split()})}
        write_json(tmp / "meta.json", meta)
    return meta


def _meta(rows: dict[str, list[dict]], sentences: list[str], sizes: dict[str, int], seed: int, jobs: int,
          min_word_sentences: int, fortunes: Path, seconds: float) -> dict:
    train_words = Counter(w for r in rows["train"] for w in r["text"].split())
    stats = {}
    for name in SPLITS:
        words = [w for r in rows[name] for w in r["text"].split()]
        stats[name] = {
            "utterances": len(rows[name]), "sentences": len({r["text"] for r in rows[name]}),
            "hours": round(sum(r["duration"] for r in rows[name]) / 3600, 4),
            "max_duration": max((r["duration"] for r in rows[name]), default=0.0),
            "words": len(words), "distinct_words": len(set(words)),
            "words_unseen_in_train": round(sum(w not in train_words for w in words) / max(len(words), 1), 4)}
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]
    return {"seed": seed, "sizes": sizes, "jobs": jobs, "seconds": round(seconds, 1),
            "espeak_ng": espeak_version(), "sentence_source": str(fortunes),
            "min_word_sentences": min_word_sentences,
            "sentences_available": len(sentences), "sentences_sha256": digest,
            "distinct_words_all_sentences": len({w for s in sentences for w in s.split()}),
            "train_voices": list(TRAIN_VOICES), "train_variants": list(TRAIN_VARIANTS),
            "held_out_variant": HELD_OUT_VARIANT, "speed_wpm": list(SPEED_WPM), "pitch": list(PITCH),
            "peak_db": list(PEAK_DB), "snr_db": list(SNR_DB), "sampling_rate": SAMPLING_RATE, "splits": stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synth", help="folder to create (default data/synth)")
    parser.add_argument("--train", type=int, default=15000,
                        help="training utterances of the fortunes (default 15000: each of the 7,747 left ~twice)")
    parser.add_argument("--valid", type=int, default=200, help="validation utterances (default 200)")
    parser.add_argument("--test", type=int, default=300,
                        help="utterances in each of test and test_voice (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, voices, gain and noise (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="espeak-ng processes at once (default 2)")
    parser.add_argument("--min-word-sentences", type=int, default=2, metavar="K",
                        help="keep sentences whose every word occurs in >= K sentences of the source (default 2)")
    parser.add_argument("--bpe", type=int, default=500, metavar="N",
                        help="tokenizer: a BPE of N ids learnt from the training sentences (default 500; "
                             "0: characters)")
    parser.add_argument("--generated", type=int, default=70000, metavar="N",
                        help="N more training utterances of new sentences made by a word bigram chain over the "
                             "training sentences (default 70000)")
    parser.add_argument("--mid-start", type=float, default=0.5, metavar="F",
                        help="share of the generated sentences that start at any word of the training text rather "
                             "than as a fortune starts (default 0.5)")
    parser.add_argument("--words", type=int, default=0, metavar="N",
                        help="N more training utterances of common English words in random order (wordfreq's, "
                             "spelt as in the wamerican dictionary; default 0; examples/synth/README.md has a run "
                             "with 20000)")
    parser.add_argument("--pairs", type=int, default=15000, metavar="N",
                        help="N more training utterances of two sentences each, training fortunes or generated "
                             "(default 15000)")
    parser.add_argument("--clean", type=float, default=0.3, metavar="F",
                        help="share of the training utterances left without noise, digital silence around the "
                             "speech (default 0.3; the held-out sets keep their noise)")
    args = parser.parse_args(argv)
    try:
        for name in ("generated", "words", "pairs"):
            if getattr(args, name) < 0:
                raise InputError(f"--{name} must be >= 0, got {getattr(args, name)}")
        for name in ("clean", "mid_start"):
            if not 0 <= getattr(args, name) <= 1:
                raise InputError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
        for name in ("train", "valid", "test", "jobs", "min_word_sentences"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        missing = missing_tools(FORTUNES, DICTIONARY if args.words else None)
        if missing:
            raise InputError(f"{' and '.join(missing)} not found; install with: "
                             + "; ".join(INSTALL[m] for m in missing))
        out = Path(args.out)
        if os.path.lexists(out):
            raise InputError(f"{out}: already exists; remove it or choose another --out")
        sizes = {"train": args.train, "valid": args.valid, "test": args.test, "test_voice": args.test}
        if args.bpe and args.bpe < 40:  # the 4 specials, 28 characters and a few merges
            raise InputError(f"--bpe must be 0 (characters) or >= 40, got {args.bpe}")
        meta = make_dataset(out, sizes, args.seed, args.jobs, args.min_word_sentences, bpe=args.bpe,
                            generated=args.generated, clean=args.clean, pairs=args.pairs, words=args.words,
                            mid_start=args.mid_start)
    except SpeechSeqError as e:
        print(f"make_data.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (storage.Interrupted): the partial folder is gone
        signum = getattr(e, "signum", 2)
        print(f"make_data.py: {'interrupted' if signum == 2 else 'terminated'}; nothing written", file=sys.stderr)
        return 128 + signum
    hours = sum(s["hours"] for s in meta["splits"].values())
    count = sum(sizes.values()) + args.generated + args.words + args.pairs
    print(f"{out}: {count} utterances, {hours:.2f} h of audio, in {meta['seconds']:.0f} s "
          f"({meta['sentences_available']} sentences available)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
