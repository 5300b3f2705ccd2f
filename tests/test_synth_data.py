"""examples/synth/make_data.py, the synthesized speech data set of issue 28: manifests, audio, disjoint splits,
determinism, its one-line errors, and the character tokenizer read alike by speechseq.text and transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "synth" / "make_data.py"
SIZES = ("--train", "12", "--valid", "4", "--test", "4", "--generated", "2", "--words", "0", "--pairs", "0",
         "--clean", "0")
KEYS = {"id", "audio", "text", "voice", "duration"}


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"synth_{name}", SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


md = _module("make_data")
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
HAVE_FORTUNES = md.FORTUNES.is_dir()
needs_fortunes = pytest.mark.skipif(not HAVE_FORTUNES, reason=f"{md.FORTUNES} missing: sudo apt-get install fortunes")
needs_both = pytest.mark.skipif(not (HAVE_ESPEAK and HAVE_FORTUNES),
                                reason=f"espeak-ng or fortunes missing: {md.INSTALL}")
HAVE_WORDS = md.DICTIONARY.is_file() and importlib.util.find_spec("wordfreq") is not None
needs_words = pytest.mark.skipif(not HAVE_WORDS, reason=f"wamerican or wordfreq missing: {md.INSTALL}")


def _run(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _manifests(folder: Path) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
            for name in md.SPLITS}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    if not (HAVE_ESPEAK and HAVE_FORTUNES):
        pytest.skip(f"espeak-ng or fortunes missing: {md.INSTALL}")
    out = tmp_path_factory.mktemp("synth") / "data"
    done = _run(out, *SIZES, "--seed", "3", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    return out


@needs_both
def test_manifests_and_audio(dataset):
    rows = _manifests(dataset)
    assert {k: len(v) for k, v in rows.items()} == {"train": 14, "valid": 4, "test": 4, "test_voice": 4}
    assert sorted(p.name for p in dataset.iterdir()) == sorted(
        [*md.SPLITS, *(f"{s}.jsonl" for s in md.SPLITS), "meta.json", "tokenizer"])  # no scratch files left
    ids = [r["id"] for split in rows.values() for r in split]
    assert len(set(ids)) == len(ids)
    for name, split in rows.items():
        for r in split:
            assert set(r) == KEYS
            assert re.fullmatch(r"[a-z]+('[a-z]+)*( [a-z]+('[a-z]+)*){2,15}", r["text"]), r["text"]
            base, _, variant = r["voice"].partition("+")
            assert base in md.TRAIN_VOICES
            assert (variant == md.HELD_OUT_VARIANT) == (name == "test_voice"), r
            assert variant in md.TRAIN_VARIANTS or name == "test_voice"
            info = sf.info(str(dataset / r["audio"]))  # relative to the manifest's folder
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "FLOAT")
            assert abs(info.frames / 16000 - r["duration"]) < 1e-4
            assert 0.5 < r["duration"] < 7.0
            audio, _ = sf.read(str(dataset / r["audio"]), dtype="float32")
            rms = np.sqrt(np.mean(audio ** 2))
            assert np.abs(audio).max() <= 1.0 and rms > 3e-3, (r["id"], rms)  # speech, not silence or noise alone
    saved = json.loads((dataset / "tokenizer" / "tokenizer.json").read_text())
    # the default tokenizer: a BPE learnt from the training sentences alone (a small set stops merging early)
    assert saved == json.loads(_module("make_tokenizer").build_tokenizer([r["text"] for r in rows["train"]], 500)
                               .to_str())
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["splits"]["train"]["utterances"] == 14 and meta["held_out_variant"] == md.HELD_OUT_VARIANT
    assert meta["tokenizer"] == "bpe 500"


@needs_both
def test_splits_share_no_sentence(dataset):
    texts = {name: {r["text"] for r in split} for name, split in _manifests(dataset).items()}
    assert [len(texts[n]) for n in md.SPLITS] == [4, 4, 4, 14]  # 12 fortunes, 2 generated
    for i, a in enumerate(md.SPLITS):
        for b in md.SPLITS[i + 1:]:
            assert not texts[a] & texts[b], (a, b)


@needs_fortunes
def test_deal_at_full_size():
    """The default sizes: disjoint sets of distinct sentences, and held-out sets that do not move with --train."""
    sentences = md.load_sentences()
    assert len(sentences) == len(set(sentences)) > 8000
    sizes = {"train": 6000, "valid": 200, "test": 300, "test_voice": 300}
    sets = md.deal(sentences, sizes, seed=0)
    assert {k: len(v) for k, v in sets.items()} == sizes
    seen: set[str] = set()
    for name in md.SPLITS:
        assert len(set(sets[name])) == len(sets[name]) and not seen & set(sets[name]), name
        seen |= set(sets[name])
    small = md.deal(sentences, {**sizes, "train": 12}, seed=0)
    assert all(small[n] == sets[n] for n in ("test", "test_voice", "valid")) and small["train"] == sets["train"][:12]
    assert md.deal(sentences, sizes, seed=1)["test"] != sets["test"]
    # more training utterances than sentences: train cycles over every remaining sentence with new voices
    big = md.plan(md.deal(sentences, {**sizes, "train": len(sentences)}, 0), {**sizes, "train": len(sentences)}, 0)
    train = [u for u in big if u.split == "train"]
    assert len({u.text for u in train}) == len(sentences) - 800 and len(train) == len(sentences)


@needs_fortunes
def test_generated_sentences_are_new_and_made_of_training_bigrams():
    sentences = md.load_sentences()
    sets = md.deal(sentences, {"train": 6000, "valid": 200, "test": 300, "test_voice": 300}, seed=0)
    held_out = {s for name in ("test", "test_voice", "valid") for s in sets[name]}
    made = md.generate(sets["train"], 2000, seed=0, avoid=held_out)
    assert made == md.generate(sets["train"], 2000, seed=0, avoid=held_out) != md.generate(sets["train"], 2000, 1)
    assert len(set(made)) == 2000 and not set(made) & (set(sentences) | held_out)
    pairs = {p for s in sets["train"] for p in zip(["<s>", *s.split()], [*s.split(), "</s>"])}
    for s in made:
        words = s.split()
        assert md.MIN_WORDS <= len(words) <= md.MAX_WORDS and len(s) <= md.MAX_CHARS, s
        assert set(zip(["<s>", *words], [*words, "</s>"])) <= pairs, s
    with pytest.raises(md.InputError, match="fewer than --generated 5"):
        md.generate(["one two three"], 5, seed=0)  # a chain with one path makes nothing new


@needs_fortunes
def test_mid_start_chains_begin_at_any_training_word():
    """A ``mid_start`` share of the chains starts at a word drawn from the training text, not as a sentence starts:
    the sentences begin with many more different words, and every other pair of neighbours is still a training
    bigram. Without it every chain starts as a training sentence does."""
    sets = md.deal(md.load_sentences(), {"train": 6000, "valid": 200, "test": 300, "test_voice": 300}, seed=0)
    held_out = {s for name in ("test", "test_voice", "valid") for s in sets[name]}
    plain = md.generate(sets["train"], 2000, seed=0, avoid=held_out)
    made = md.generate(sets["train"], 2000, seed=0, avoid=held_out, mid_start=0.5)
    assert len(set(made)) == 2000 and not set(made) & (set(sets["train"]) | held_out)
    starts = {s.split()[0] for s in sets["train"]}
    pairs = {p for s in sets["train"] for p in zip(s.split(), [*s.split()[1:], "</s>"])}
    vocabulary = {w for s in sets["train"] for w in s.split()}
    assert all(s.split()[0] in starts for s in plain)
    elsewhere = [s for s in made if s.split()[0] not in starts]
    assert 0.3 * len(made) < len(elsewhere) < 0.5 * len(made)  # half the chains, most at a word no sentence starts with
    assert len({s.split()[0] for s in made}) > 2 * len({s.split()[0] for s in plain})
    for s in made:
        words = s.split()
        assert words[0] in vocabulary and set(zip(words, [*words[1:], "</s>"])) <= pairs, s


@needs_fortunes
def test_pairs_join_two_pool_sentences_within_the_length():
    pool = md.load_sentences()[:3000]
    made = md.pair(pool, 500, seed=0)
    assert made == md.pair(pool, 500, seed=0) != md.pair(pool, 500, seed=1)
    for text in made:
        a, b = text.split(". ")
        assert a in pool and b in pool and a != b and len(a) + 1 + len(b) <= md.PAIR_MAX_CHARS, text
    with pytest.raises(md.InputError, match="fewer than --pairs 2"):
        md.pair(["one two three four five six seven", "eight nine ten eleven twelve"], 2, seed=0, max_chars=40)


@needs_both
def test_pairs_are_spoken_as_two_sentences_after_the_rest(dataset, tmp_path):
    """--pairs 2 appends two training utterances (transcript without the full stop, longer than either sentence
    spoken alone) and leaves every other row and file as it was."""
    out = tmp_path / "pairs"
    assert _run(out, *SIZES, "--seed", "3", "--jobs", "2", "--pairs", "2").returncode == 0
    before, after = _manifests(dataset), _manifests(out)
    assert {k: v for k, v in after.items() if k != "train"} == {k: v for k, v in before.items() if k != "train"}
    assert after["train"][:-2] == before["train"] and len(after["train"]) == len(before["train"]) + 2
    pool = {r["text"] for r in before["train"]}
    for r in after["train"][-2:]:
        splits = [(r["text"][:i], r["text"][i + 1:]) for i, c in enumerate(r["text"]) if c == " "]
        assert any(a in pool and b in pool for a, b in splits), r["text"]
        assert (out / r["audio"]).is_file() and r["duration"] > 1.5
    assert json.loads((out / "meta.json").read_text())["pairs"] == 2
    assert "--pairs must be >= 0, got -1" in _run(tmp_path / "bad", "--pairs", "-1").stderr


@needs_words
def test_common_words_are_frequent_dictionary_words():
    words, freqs = md.load_common_words()
    assert 30000 < len(words) == len(set(words)) == len(freqs) and (freqs > 0).all()
    assert (np.diff(freqs) <= 0).all() and words[:3] == ["the", "to", "and"]  # most frequent first
    known = set(md.DICTIONARY.read_text().split())
    assert all(md._WORD.fullmatch(w) and w in known for w in words)
    assert {"text", "speech", "wrote", "don't", "a", "i"} <= set(words)
    assert not {"tv", "ok", "x", "b", "www", "lol"} & set(words)  # abbreviations, letters, slang: not as words


def test_word_lists_draw_words_by_frequency_to_a_power():
    words, freqs = ["aa", "bb", "cc"], np.array([9.0, 1.0, 0.0])
    lists = md.word_lists(words, freqs, 3000, seed=0)
    assert lists == md.word_lists(words, freqs, 3000, seed=0) != md.word_lists(words, freqs, 3000, seed=1)
    drawn = [w for t in lists for w in t.split()]
    assert {len(t.split()) for t in lists} == set(range(md.MIN_WORDS, md.WORD_LIST_MAX_WORDS + 1))
    assert all(len(t) <= md.MAX_CHARS for t in lists) and "cc" not in drawn  # frequency 0: never
    assert 2.8 < drawn.count("aa") / drawn.count("bb") < 3.2  # 9 ** 0.5 : 1 ** 0.5
    one = [w for t in md.word_lists(words, freqs, 3000, seed=0, exponent=1.0) for w in t.split()]
    assert 8.2 < one.count("aa") / one.count("bb") < 9.9
    with pytest.raises(md.InputError, match="fewer than --words 2"):
        md.word_lists(["a" * 30], np.ones(1), 2, seed=0)  # 3 words of 30 letters never fit in 80 characters


@needs_both
@needs_words
def test_word_lists_are_spoken_after_the_generated_sentences(dataset, tmp_path):
    """--words 2 puts two training utterances of common words after the generated sentences (before the pairs),
    and leaves every other row as it was."""
    out = tmp_path / "words"
    assert _run(out, *SIZES, "--seed", "3", "--jobs", "2", "--words", "2").returncode == 0
    before, after = _manifests(dataset), _manifests(out)
    assert {k: v for k, v in after.items() if k != "train"} == {k: v for k, v in before.items() if k != "train"}
    assert after["train"][:-2] == before["train"] and len(after["train"]) == len(before["train"]) + 2
    common = set(md.load_common_words()[0])
    for r in after["train"][-2:]:
        assert set(r["text"].split()) <= common and (out / r["audio"]).is_file(), r["text"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["words"] == 2 and meta["word_source"]["exponent"] == md.WORD_EXPONENT
    assert "--words must be >= 0, got -1" in _run(tmp_path / "bad", "--words", "-1").stderr


def test_missing_word_sources_are_named(tmp_path):
    assert "wamerican" in md.missing_tools(md.FORTUNES, tmp_path / "no-dictionary")
    assert "wamerican" not in md.missing_tools(md.FORTUNES, None)  # --words 0 needs neither


@needs_both
def test_same_seed_same_data(dataset, tmp_path):
    again = tmp_path / "again"
    assert _run(again, *SIZES, "--seed", "3", "--jobs", "1").returncode == 0
    first, second = _manifests(dataset), _manifests(again)
    assert first == second
    for r in (r for split in first.values() for r in split):
        assert (dataset / r["audio"]).read_bytes() == (again / r["audio"]).read_bytes(), r["id"]
    other = tmp_path / "other"
    assert _run(other, *SIZES, "--seed", "4", "--jobs", "2").returncode == 0
    assert _manifests(other)["test"] != first["test"]


@needs_both
def test_clean_share_leaves_training_utterances_without_noise_and_the_rest_alone(dataset, tmp_path):
    """--clean 1: every training utterance is the noisy one without its noise (digital silence before the speech),
    every held-out file is byte for byte the noisy data set's."""
    import soundfile as sf

    clean = tmp_path / "clean"
    assert _run(clean, *SIZES, "--seed", "3", "--jobs", "2", "--clean", "1").returncode == 0
    noisy_rows, clean_rows = _manifests(dataset), _manifests(clean)
    assert noisy_rows == clean_rows
    for split, rows in clean_rows.items():
        for r in rows:
            same = (dataset / r["audio"]).read_bytes() == (clean / r["audio"]).read_bytes()
            assert same == (split != "train"), r["id"]
    for r in clean_rows["train"]:
        noisy, quiet = sf.read(dataset / r["audio"])[0], sf.read(clean / r["audio"])[0]
        assert quiet[0] == 0.0 and noisy[0] != 0.0
        assert 20 <= 10 * np.log10(np.mean(quiet ** 2) / np.mean((noisy - quiet) ** 2)) <= 40  # the SNR drawn
    assert "--clean must be between 0 and 1, got 2.0" in _run(tmp_path / "bad", "--clean", "2").stderr


@pytest.mark.skipif(not HAVE_ESPEAK, reason=f"espeak-ng missing: {md.INSTALL}")
def test_every_voice_and_variant_changes_the_sound(tmp_path):
    """espeak-ng ignores an unknown variant (and any variant of "en-gb") without a word: each must be heard."""
    def sound(voice: str) -> bytes:
        path = tmp_path / "v.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), "the weather is nice today"], check=True)
        return path.read_bytes()

    voices = [sound(v) for v in md.TRAIN_VOICES]
    assert len(set(voices)) == len(voices)
    variants = [sound(f"en+{v}" if v else "en") for v in (*md.TRAIN_VARIANTS, md.HELD_OUT_VARIANT)]
    assert len(set(variants)) == len(variants)
    assert all(sound(f"{v}+m3") != plain for v, plain in zip(md.TRAIN_VOICES, voices))


def test_bad_input_is_one_line(tmp_path):
    exists = tmp_path / "exists"
    exists.mkdir()
    cases = [((exists,), "already exists; remove it or choose another --out"),
             ((tmp_path / "a", "--train", "0"), "--train must be >= 1, got 0"),
             ((tmp_path / "b", "--min-word-sentences", "0"), "--min-word-sentences must be >= 1, got 0"),
             ((tmp_path / "e", "--generated", "-1"), "--generated must be >= 0, got -1"),
             ((tmp_path / "f", "--mid-start", "2"), "--mid-start must be between 0 and 1, got 2.0")]
    if HAVE_ESPEAK and HAVE_FORTUNES and HAVE_WORDS:  # with a tool missing, that message comes first
        for (out, *args), message in cases:
            done = _run(out, *args)
            assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    env = {**os.environ, "PATH": str(tmp_path)}  # no espeak-ng on it (the script runs by absolute path)
    done = _run(tmp_path / "c", env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "espeak-ng" in done.stderr and "sudo apt-get install espeak-ng" in done.stderr
    assert not (tmp_path / "c").exists()


@needs_both
def test_terminated_run_leaves_nothing(tmp_path):
    """SIGTERM while speaking: status 143, one line, and neither the folder nor its partial folder is left."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path / "d"), "--train", "5000",
                             "--generated", "0", "--words", "0", "--pairs", "0", "--jobs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".d.partial-*/*/*.wav")) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "make_data.py: terminated; nothing written"
    assert list(tmp_path.iterdir()) == []


def test_normalise():
    assert md.normalise('Well-known facts, they say, are "boring"!') == "well known facts they say are boring"
    assert md.normalise("'Tis the season... to be jolly.") == "tis the season to be jolly"
    assert md.normalise("It's the dogs' dinner, isn't it?") == "it's the dogs dinner isn't it"
    for dropped in ("Mr. Smith went home.", "It is 5 o'clock now.", "I don't like IBM much.", "Use e.g. this one.",
                    "Q: Why not?", "no capital at the start.", "No full stop at the end", "Two words.",
                    "Plan x is the best one.", " ".join(["word"] * 17) + ".", "Caf\u00e9 au lait is nice."):
        assert md.normalise(dropped) is None, dropped
    assert md.split_sentences('Dr. Who is here. He left!  "Why?" she said. Why not?') == [
        "Dr. Who is here.", "He left!", '"Why?" she said.', "Why not?"]


@needs_fortunes
@pytest.mark.parametrize("bpe", [0, 300])
def test_tokenizer_round_trip(tmp_path, bpe):
    """speechseq.text and transformers read the saved tokenizer (characters, or a BPE learnt from half the
    sentences) alike: same ids, same decoded text, for every sentence the data set can hold, and decoding gives the
    sentence back."""
    import transformers

    from speechseq.text import Tokenizer

    sentences = md.load_sentences()
    _module("make_tokenizer").save_tokenizer(tmp_path / "tok", sentences[::2] if bpe else None, bpe)
    ours, theirs = Tokenizer.from_pretrained(tmp_path / "tok"), transformers.AutoTokenizer.from_pretrained(
        tmp_path / "tok")
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 2, 3)
    assert (theirs.pad_token_id, theirs.cls_token_id, theirs.sep_token_id, len(theirs)) == (0, 2, 3, len(ours))
    ids = theirs(sentences)["input_ids"]
    unk = ours.unk_token_id
    for text, expected in zip(sentences, ids):
        got = ours.encode(text)
        assert got == expected, text
        assert got[0] == 2 and got[-1] == 3 and unk not in got, text
        assert len(got) == len(text) + 2 if not bpe else len(got) < len(text) + 2, text
        assert ours.decode(got, skip_special_tokens=True) == theirs.decode(got, skip_special_tokens=True) == text
        assert ours.decode(got) == theirs.decode(got)
    # text outside the alphabet: lowercased by both, the rest [UNK]
    odd = "Hello, World 42"
    assert ours.encode(odd) == theirs(odd)["input_ids"] and ours.decode(ours.encode(odd)) == theirs.decode(
        theirs(odd)["input_ids"])
    labels = ours.encode_labels(sentences[:3], strip_start_id=2)
    assert (labels[:, 0] != 2).all() and ((labels == 3).sum(axis=1) == 1).all()


@pytest.mark.parametrize("encoder,decoder,layers", [("speech_to_text", "bert", 3), ("wav2vec2", "bert", 3),
                                                    ("speech_to_text", "mbart", 2)])
def test_make_model_writes_a_checkpoint_that_transcribes_and_trains(tmp_path, encoder, decoder, layers):
    """make_model.py: a complete untrained checkpoint of either encoder (filterbank or waveform) and either decoder
    whose processor feeds its encoder, with a finite loss on the tokenizer's labels; an existing folder is never
    replaced."""
    import jax

    from speechseq import SpeechSeq2Seq
    from speechseq.errors import SpeechSeqError
    from speechseq.processor import Processor

    tokenizer = _module("make_tokenizer").save_tokenizer(tmp_path / "tokenizer")
    out = _module("make_model").make_model(tokenizer, tmp_path / "init", encoder=encoder, decoder=decoder,
                                           decoder_layers=layers)
    model, processor = SpeechSeq2Seq.from_pretrained(out), Processor.from_pretrained(out)
    assert model.config.encoder.model_type == encoder and model.config.decoder.model_type == decoder
    assert model.config.decoder.num_layers == layers
    assert sum(x.size for x in jax.tree.leaves(model.params)) < 6e6  # the 25 MB budget of issue 28
    audio = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    batch = processor(audio=[audio, audio[:12000]], text=["hello world", "speech"])
    loss = float(model(**batch).loss)
    assert np.isfinite(loss) and loss > 0
    with pytest.raises(SpeechSeqError):
        _module("make_model").make_model(tokenizer, out, encoder=encoder)
