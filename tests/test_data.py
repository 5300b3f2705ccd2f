"""speechseq.data: manifests, and the Loader's batches against transformers' speech seq2seq recipe
(``run_speech_recognition_seq2seq.py``: Wav2Vec2FeatureExtractor on each row, ``feature_extractor.pad``; the
tokenizer's ids, ``tokenizer.pad`` with -100, DataCollatorSpeechSeq2SeqWithPadding's strip of a leading
decoder_start_token_id), then bucket shapes, determinism, resume, process sharding and epoch coverage."""

from __future__ import annotations

import json
import string
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import soxr

from conftest import SPEECH_TEXTS, synthesize
from speechseq.audio import load_audio
from speechseq.data import Loader, read_manifest, single_threaded_blas
from speechseq.data.order import length_grouped_batches, permutation
from speechseq.errors import ConfigError, InputError
from speechseq.processor import Processor

WORDS = sorted({w for text in SPEECH_TEXTS for w in text.split()})
CLS, PAD, SEP = 0, 1, 2


def make_processor(path, **extractor):
    """A checkpoint folder with a WordPiece tokenizer ([CLS]=0 [PAD]=1 [SEP]=2, every lower-case word spellable)
    and a Wav2Vec2FeatureExtractor, both saved by transformers; returns our Processor of it."""
    import transformers as T

    vocab = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] + WORDS + list(string.ascii_lowercase)
    vocab += [f"##{c}" for c in string.ascii_lowercase]
    path.mkdir(parents=True, exist_ok=True)
    T.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(path)
    T.Wav2Vec2FeatureExtractor(**{"return_attention_mask": True, **extractor}).save_pretrained(path)
    return Processor.from_pretrained(path)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return make_processor(tmp_path_factory.mktemp("processor"))


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, speech_clips):
    """40 rows, relative paths: the 16 espeak-ng clips, and 24 noise bursts of 0.2-3.5 s with texts of 1-12 words."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = [{"audio": str(path), "text": text} for path, text in speech_clips]
    (folder / "noise").mkdir()
    for i in range(24):
        name = f"noise/n{i:02d}.flac"
        sf.write(folder / name, 0.1 * rng.standard_normal(int(rng.integers(3200, 56000))), 16000)
        rows.append({"audio": name, "text": " ".join(rng.choice(WORDS, int(rng.integers(1, 13))))})
    write_jsonl(folder / "train.jsonl", rows)
    return folder / "train.jsonl"


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g["ids"] == w["ids"]
        for key in g.keys() - {"ids"}:
            assert g[key].dtype == w[key].dtype
            np.testing.assert_array_equal(g[key], w[key])


# ---- manifests -------------------------------------------------------------------------------------------------------

def test_manifest_formats_agree_and_resolve_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "clips").mkdir()
    texts = ["hello world", 'a "quoted", comma text', "the fox"]
    for i, text in enumerate(texts):
        sf.write(tmp_path / "clips" / f"c{i}.wav", np.zeros(1600, np.float32), 16000)
        (tmp_path / "clips" / f"c{i}.txt").write_text(text + "\n")
    rel = [f"clips/c{i}.wav" for i in range(3)]
    write_jsonl(tmp_path / "m.jsonl", [{"audio": a, "text": t, "id": f"u{i}"}
                                       for i, (a, t) in enumerate(zip(rel, texts))])
    (tmp_path / "m.csv").write_text("audio,text\n" + "".join(f'{a},"{t.replace(chr(34), 2 * chr(34))}"\n'
                                                                for a, t in zip(rel, texts)))
    (tmp_path / "m.tsv").write_text("path\tsentence\tup_votes\n"
                                    + "".join(f"{a}\t{t}\t2\n" for a, t in zip(rel, texts)))
    write_jsonl(tmp_path / "nemo.jsonl", [{"audio_filepath": str(tmp_path / a), "text": t} for a, t in zip(rel, texts)])
    monkeypatch.chdir(tmp_path / "clips")  # relative paths resolve against the manifest's folder, not the cwd
    want_audio = [str(tmp_path / a) for a in rel]
    for name in ("m.jsonl", "m.csv", "m.tsv", "nemo.jsonl", "clips"):
        rows = read_manifest(tmp_path / name)
        assert [r.audio for r in rows] == want_audio, name
        assert [r.text for r in rows] == texts, name
        assert all(r.problem is None for r in rows)
    assert [r.id for r in read_manifest(tmp_path / "m.jsonl")] == ["u0", "u1", "u2"]
    assert [r.id for r in read_manifest(tmp_path / "m.csv")] == rel  # no id column: the path as written
    assert [r.where for r in read_manifest(tmp_path / "m.csv")] == [f"{tmp_path / 'm.csv'}:{n}" for n in (2, 3, 4)]
    assert [r.id for r in read_manifest(tmp_path / "clips")] == ["c0.wav", "c1.wav", "c2.wav"]
    custom = tmp_path / "custom.jsonl"
    write_jsonl(custom, [{"wav": rel[0], "transcript_en": "hi"}])
    assert read_manifest(custom, audio_key="wav", text_key="transcript_en")[0].text == "hi"


@pytest.mark.parametrize("name, content, needle", [
    ("m.jsonl", '{"audio": "a.wav", "text": "x"}\n\n{"audio": "b.wav", "text": "y"\n', ":3: malformed JSON"),
    ("m.jsonl", '{"audio": "a.wav", "text": "x"}\n{"audio": "b.wav"}\n', ":2: no text field 'text'"),
    ("m.jsonl", '{"audio": "a.wav", "text": 5}\n', ":1: text should be a string, got 5"),
    ("m.jsonl", '["a.wav", "x"]\n', ":1: expected a JSON object, got list"),
    ("m.jsonl", '{"audio": "", "text": "x"}\n', ":1: audio should be a file path"),
    ("m.csv", 'audio,text\na.wav,hello\nb.wav,hello,extra\n', ":3: more fields than the header's 2"),
    ("m.tsv", 'audio\ttext\na.wav\n', ":2: fewer fields than the header's 2"),
])
def test_malformed_rows_name_file_and_line_or_are_kept_for_counting(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError) as e:
        read_manifest(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value) and "\n" not in str(e.value)
    rows = read_manifest(path, on_bad="skip")
    bad = [r for r in rows if r.problem]
    assert len(bad) == 1 and needle.split(": ", 1)[1] in bad[0].problem and bad[0].where.endswith(needle.split(": ")[0])


def test_manifest_file_errors(tmp_path):
    cases = [(tmp_path / "none.jsonl", "manifest not found"), (tmp_path / "m.txt", "unknown manifest type '.txt'"),
             (tmp_path / "empty.csv", "empty; expected a header row"), (tmp_path / "latin.jsonl", "not UTF-8"),
             (tmp_path / "nothing", "folder holds no audio files")]
    (tmp_path / "m.txt").write_text("a.wav\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "latin.jsonl").write_bytes(b'{"audio": "caf\xe9.wav", "text": "x"}\n')
    (tmp_path / "nothing").mkdir()
    for path, needle in cases:
        with pytest.raises(InputError, match=needle) as e:
            read_manifest(path)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="on_bad: expected 'skip' or 'raise'"):
        read_manifest(tmp_path / "m.jsonl", on_bad="ignore")
    (tmp_path / "pairs").mkdir()
    sf.write(tmp_path / "pairs" / "a.wav", np.zeros(800), 16000)
    with pytest.raises(InputError, match=r"a\.wav: no transcript a\.txt beside it"):
        read_manifest(tmp_path / "pairs")
    assert read_manifest(tmp_path / "pairs", on_bad="skip")[0].problem == "no transcript a.txt beside it"


# ---- bad rows --------------------------------------------------------------------------------------------------------

@pytest.fixture
def bad_manifest(tmp_path):
    """A manifest with one row of each kind the Loader skips, between good rows; returns (path, {reason: line})."""
    sf.write(tmp_path / "good.wav", 0.1 * np.sin(np.arange(16000) / 7.0), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(3 * 16000), 16000)
    sf.write(tmp_path / "short.wav", np.zeros(160), 16000)
    (tmp_path / "text.wav").write_text("not audio at all")
    good = {"audio": "good.wav", "text": "hello world"}
    lines = {"missing_file": {"audio": "gone.wav", "text": "hello"}, "empty_text": {"audio": "good.wav", "text": " "},
             "audio_too_long": {"audio": "long.wav", "text": "hello"}, "malformed": '{"audio": "good.wav",',
             "labels_too_long": {"audio": "good.wav", "text": "the quick brown fox in the world"},
             "unreadable": {"audio": "text.wav", "text": "hello"}, "audio_too_short": {"audio": "short.wav",
                                                                                      "text": "hello"}}
    rows, where = [good], {}
    for reason, row in lines.items():
        rows.append(row)
        where[reason] = len(rows)
        rows.append(good)
    write_jsonl(tmp_path / "m.jsonl", rows)
    return tmp_path / "m.jsonl", where


LIMITS = dict(max_audio_seconds=2.0, min_audio_seconds=0.05, max_label_tokens=6)


def test_bad_rows_are_skipped_and_counted(bad_manifest, processor):
    path, where = bad_manifest
    loader = Loader(read_manifest(path, on_bad="skip"), processor, batch_size=2, **LIMITS)
    assert loader.skipped == dict.fromkeys(where, 1)
    assert loader.usable_rows == len(where) + 1
    assert sum(len(b) for b in loader.plan(0)) == len(where) + 1 - (len(where) + 1) % 2
    batch = next(iter(loader))
    assert batch["labels"].shape[1] == 6 and batch["input_values"].shape[1] == 16000  # capped buckets


@pytest.mark.parametrize("reason, needle", [
    ("missing_file", "audio file not found: "), ("empty_text", "empty text"),
    ("audio_too_long", "audio is 3.00 s, longer than max_audio_seconds 2"), ("malformed", "malformed JSON"),
    ("labels_too_long", "text is 9 tokens, more than max_label_tokens 6"), ("unreadable", "cannot read as audio"),
    ("audio_too_short", "audio is 0.010 s, shorter than min_audio_seconds 0.05")])
def test_bad_rows_stop_the_run_naming_the_row(bad_manifest, processor, reason, needle):
    path, where = bad_manifest
    rows = read_manifest(path, on_bad="skip")
    with pytest.raises(InputError) as e:  # each bad row alone among good ones
        Loader([r for i, r in enumerate(rows, 1) if i == where[reason] or i not in where.values()], processor,
               batch_size=2, on_bad="raise", **LIMITS)
    assert str(e.value).startswith(f"{path}:{where[reason]}: ") and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_audio_that_fails_to_decode_after_its_header(tmp_path, processor):
    """A file whose header reads but whose samples do not (NaN): a padding row (no loss) and a count, or an error."""
    sf.write(tmp_path / "good.wav", 0.1 * np.sin(np.arange(8000) / 5.0), 16000)
    sf.write(tmp_path / "nan.wav", np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT")
    write_jsonl(tmp_path / "m.jsonl", [{"audio": "good.wav", "text": "hello", "id": "g"},
                                       {"audio": "nan.wav", "text": "world", "id": "n"}])
    rows = read_manifest(tmp_path / "m.jsonl")
    loader = Loader(rows, processor, batch_size=2, shuffle=False)
    assert loader.skipped["unreadable"] == 0
    batch = next(iter(loader))
    assert batch["ids"] == ["g", None] and loader.skipped["unreadable"] == 1
    assert (batch["labels"][1] == -100).all() and (batch["attention_mask"][1] == 0).all()
    assert (batch["input_values"][1] == 0).all() and (batch["labels"][0] != -100).any()
    assert loader.get_state()["load_skipped"] == 1
    with pytest.raises(InputError, match=rf"^{tmp_path / 'm.jsonl'}:2: .*nan\.wav: contains NaN"):
        next(iter(Loader(rows, processor, batch_size=2, shuffle=False, on_bad="raise")))


def test_bad_settings(manifest, processor):
    rows = read_manifest(manifest)
    for kwargs, needle in [(dict(batch_size=0), "batch_size should be an integer >= 1"),
                           (dict(batch_size=6, process_count=4), "batch_size 6 is not divisible by process_count 4"),
                           (dict(batch_size=4, process_count=2, process_index=2), "process_index should be"),
                           (dict(batch_size=4, on_bad="warn"), "on_bad: expected"),
                           (dict(batch_size=4, max_audio_seconds=0), "max_audio_seconds should be"),
                           (dict(batch_size=4, label_buckets=()), "label_buckets should list")]:
        with pytest.raises((ConfigError, InputError), match=needle):
            Loader(rows, processor, **kwargs)
    with pytest.raises(InputError, match="only 40 usable rows, fewer than batch_size 64"):
        iter(Loader(rows, processor, batch_size=64))
    with pytest.raises(InputError, match=r"no usable rows among 40 \(skipped: audio_too_long 40\)"):
        Loader(rows, processor, batch_size=4, max_audio_seconds=0.1)


# ---- audio: resampling, real speech ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [22050, 8000])
def test_resampling_to_16k_against_an_analytic_sine(tmp_path, rate):
    sf.write(tmp_path / "sine.wav", 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate), rate, subtype="FLOAT")
    write_jsonl(tmp_path / "m.jsonl", [{"audio": "sine.wav", "text": "a"}])
    processor = make_processor(tmp_path / "p", do_normalize=False)
    batch = next(iter(Loader(read_manifest(tmp_path / "m.jsonl"), processor, batch_size=1)))
    row = batch["input_values"][0]
    assert batch["attention_mask"].sum() == 16000 and row.shape == (16000,)  # the 1 s bucket, filled
    target = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    edge = 800  # 50 ms: the resampling filter rings at the file's ends
    assert np.abs(row[edge:-edge] - target[edge:-edge]).max() < 1e-5  # measured 5e-7


def test_speech_at_22050_and_8000_hz_lands_on_the_same_16k_time_base(tmp_path, processor):
    """espeak-ng's 22.05 kHz clip, and the same clip made 8 kHz by sox: both resampled to 16 kHz have the length
    n * 16000 / rate and the same waveform below 4 kHz."""
    text = "the quick brown fox"
    wide = synthesize(text, tmp_path / "wide.wav")
    narrow = synthesize(text, tmp_path / "narrow.wav", rate=8000)
    write_jsonl(tmp_path / "m.jsonl", [{"audio": "wide.wav", "text": text, "id": "w"},
                                       {"audio": "narrow.wav", "text": text, "id": "n"}])
    batch = next(iter(Loader(read_manifest(tmp_path / "m.jsonl"), make_processor(tmp_path / "p", do_normalize=False),
                             batch_size=2, shuffle=False)))
    lengths = dict(zip(batch["ids"], batch["attention_mask"].sum(1)))
    assert lengths["w"] == round(sf.info(wide).frames * 16000 / 22050)
    assert lengths["n"] == round(sf.info(narrow).frames * 16000 / 8000)
    n = min(lengths.values())
    rows = dict(zip(batch["ids"], batch["input_values"][:, :n]))
    lowpass = soxr.resample(soxr.resample(rows["w"], 16000, 8000), 8000, 16000)[:n]  # what the 8 kHz file keeps
    corr = np.corrcoef(lowpass, rows["n"])[0, 1]
    assert corr > 0.999, corr  # measured 0.99999999


def assert_matches_transformers(batch: dict, examples: list, folder, decoder_start: int | None) -> np.ndarray:
    """``batch`` against transformers' recipe for ``examples`` (its rows): Wav2Vec2FeatureExtractor on each row, then
    ``pad(padding="max_length")`` to the batch's width; labels as DataCollatorSpeechSeq2SeqWithPadding makes them
    (the tokenizer's ids, ``tokenizer.pad``, -100 where the mask is 0, the first column dropped when every row
    starts with ``decoder_start``), then our bucket's extra columns all -100. Returns transformers' labels."""
    import transformers as T

    fe = T.Wav2Vec2FeatureExtractor.from_pretrained(folder)
    tok = T.AutoTokenizer.from_pretrained(folder)
    width = batch["input_values"].shape[1]
    feats = [{"input_values": fe(load_audio(ex.audio), sampling_rate=16000).input_values[0]} for ex in examples]
    ref = fe.pad(feats, padding="max_length", max_length=width, return_tensors="np")
    np.testing.assert_array_equal(batch["input_values"], ref["input_values"])
    assert ("attention_mask" in batch) == fe.return_attention_mask
    if fe.return_attention_mask:
        np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    label_batch = tok.pad([{"input_ids": tok(ex.text).input_ids} for ex in examples], return_tensors="pt")
    labels = label_batch["input_ids"].masked_fill(label_batch.attention_mask.ne(1), -100)
    if decoder_start is not None and (labels[:, 0] == decoder_start).all().item():
        labels = labels[:, 1:]
    labels = labels.numpy()
    np.testing.assert_array_equal(batch["labels"][:, :labels.shape[1]], labels)
    assert (batch["labels"][:, labels.shape[1]:] == -100).all() and batch["labels"].dtype == np.int32
    return labels


@pytest.mark.parametrize("return_attention_mask, padding_value", [(True, 0.0), (False, 0.0), (False, 0.5)])
@pytest.mark.parametrize("decoder_start", [CLS, SEP, None])
def test_batches_match_transformers_recipe(tmp_path, speech_clips, return_attention_mask, padding_value,
                                           decoder_start):
    """Every batch of an epoch of real speech equals transformers' (``assert_matches_transformers``); with the
    BERT tokenizer every row starts with [CLS], so decoder_start [CLS] is stripped and [SEP] is not."""
    write_jsonl(tmp_path / "m.jsonl", [{"audio": str(p), "text": t} for p, t in speech_clips])
    processor = make_processor(tmp_path / "p", return_attention_mask=return_attention_mask,
                               padding_value=padding_value)
    rows = {r.id: r for r in read_manifest(tmp_path / "m.jsonl")}
    loader = Loader(list(rows.values()), processor, batch_size=4, decoder_start_token_id=decoder_start, seed=3)
    batches = take(iter(loader), loader.batches_per_epoch)
    assert sorted(i for b in batches for i in b["ids"]) == sorted(rows)
    for batch in batches:
        labels = assert_matches_transformers(batch, [rows[i] for i in batch["ids"]], tmp_path / "p", decoder_start)
        assert (labels[:, 0] == CLS).all() == (decoder_start != CLS)


def test_decoder_start_is_dropped_only_when_every_row_of_the_global_batch_starts_with_it(tmp_path, speech_clips):
    """A tokenizer that adds no special tokens, and decoder_start = the id of "hello": a batch whose rows all begin
    with "hello" loses that column, a batch where one row does not keeps it in every row (the label bucket too is
    chosen after that decision), as transformers' collator does; and with 2 processes the decision is the global
    batch's, so each process's rows are the one-process batch's rows."""
    import tokenizers
    import transformers as T

    vocab = ["[PAD]", "[UNK]"] + WORDS + list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece({t: i for i, t in enumerate(vocab)},
                                                               unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    folder = tmp_path / "p"
    T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
                              ).save_pretrained(folder)
    T.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder)
    hello = vocab.index("hello")
    texts = ["hello world", "hello jax", "hello", "the fox"]
    write_jsonl(tmp_path / "m.jsonl", [{"audio": str(speech_clips[i][0]), "text": t}
                                       for i, t in enumerate(texts)])
    rows = read_manifest(tmp_path / "m.jsonl")
    kwargs = dict(batch_size=2, shuffle=False, decoder_start_token_id=hello, label_buckets=(1, 2))
    first, second = take(iter(Loader(rows, Processor.from_pretrained(folder), **kwargs)), 2)
    assert first["labels"].tolist() == [[vocab.index("world")], [vocab.index("jax")]]  # the 1-token bucket
    assert_matches_transformers(first, rows[:2], folder, hello)
    assert second["labels"].tolist() == [[hello, -100], [vocab.index("the"), vocab.index("fox")]]
    assert_matches_transformers(second, rows[2:], folder, hello)
    shards = [take(iter(Loader(rows, Processor.from_pretrained(folder), process_index=p, process_count=2, **kwargs)),
                   2) for p in range(2)]
    for k, whole in enumerate((first, second)):
        assert [s[k]["labels"].tolist() for s in shards] == [[row] for row in whole["labels"].tolist()]


# ---- shapes ----------------------------------------------------------------------------------------------------------

def test_bucket_shapes_are_few_and_known_in_advance(manifest, processor):
    loader = Loader(read_manifest(manifest), processor, batch_size=4, audio_buckets=(0.5, 1, 2, 8),
                    max_audio_seconds=3.5, label_buckets=(4, 8, 32), max_label_tokens=12, num_workers=2)
    audio, labels = [8000, 16000, 32000, 56000], [4, 8, 12]
    assert loader.audio_buckets == audio and loader.label_buckets == labels
    for epoch in range(3):
        seen = set()
        for batch in take(iter(loader), loader.batches_per_epoch):
            b, n = batch["input_values"].shape
            t = batch["labels"].shape[1]
            assert n in audio and t in labels and b == 4
            assert batch["attention_mask"].sum(1).max() > (audio[audio.index(n) - 1] if n > audio[0] else 0)
            lengths = (batch["labels"] != -100).sum(1)
            assert lengths.max() > (labels[labels.index(t) - 1] if t > labels[0] else 0)  # the smallest that fits
            seen.add((b, n, t))
        assert seen == set(loader.batch_shapes(epoch)) and len(seen) <= len(audio) * len(labels)
    shapes = {(b["input_values"].shape[0], b["input_values"].shape[1], b["labels"].shape[1])
              for b in loader.epoch()}
    assert shapes == set(loader.batch_shapes(None))


# ---- order: length grouping, determinism, resume, sharding, coverage -------------------------------------------------

def test_length_grouped_batches():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1000, 100000, 1003)
    batches = length_grouped_batches(lengths, 8, seed=5, epoch=0)
    flat = np.concatenate(batches)
    assert len(batches) == 125 and len(set(flat.tolist())) == 1000  # 3 rows dropped, none repeated
    assert all((np.diff(lengths[b]) <= 0).all() for b in batches)  # each batch sorted, longest first
    assert lengths.argmax() in batches[0]
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.split(rng.permutation(1000), 125)])
    assert spread < random_spread / 10  # 50 batches per mega-batch: neighbours in length share a batch
    again = length_grouped_batches(lengths, 8, seed=5, epoch=0)
    assert all((a == b).all() for a, b in zip(batches, again))
    other = length_grouped_batches(lengths, 8, seed=5, epoch=1)
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(batches, other))
    kept = length_grouped_batches(lengths, 8, seed=5, epoch=0, drop_remainder=False)
    assert sorted(np.concatenate(kept).tolist()) == list(range(1003))


def test_permutation_is_uniform_and_seeded():
    assert sorted(permutation(1000, 0, 0).tolist()) == list(range(1000))
    first = Counter(int(permutation(5, seed, 0)[0]) for seed in range(5000))
    assert all(abs(first[i] - 1000) < 150 for i in range(5)), first  # 5 sigma
    assert (permutation(50, 1, 2) == permutation(50, 1, 2)).all() and (permutation(50, 1, 2) != permutation(50, 2, 2)
                                                                       ).any()
    assert (permutation(50, 1, 2, stream=1) != permutation(50, 1, 2)).any()


def test_same_seed_same_batches_whatever_the_workers(manifest, processor):
    rows = read_manifest(manifest)
    runs = [take(iter(Loader(rows, processor, batch_size=4, seed=7, num_workers=w, prefetch=p)), 25)
            for w, p in [(0, 0), (1, 1), (4, 3)]]
    assert_same_batches(runs[1], runs[0])
    assert_same_batches(runs[2], runs[0])
    other = take(iter(Loader(rows, processor, batch_size=4, seed=8)), 10)
    assert [b["ids"] for b in other] != [b["ids"] for b in runs[0][:10]]
    ordered = take(iter(Loader(rows, processor, batch_size=4, shuffle=False)), 11)
    assert [i for b in ordered[:10] for i in b["ids"]] == [r.id for r in rows]
    assert_same_batches(ordered[10:], ordered[:1])  # epoch 2 of an unshuffled loader repeats epoch 1


def blas_threads() -> set[int]:
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_single_threaded_blas_is_one_thread_inside_and_as_before_after(manifest, processor):
    """numpy's BLAS runs on one thread inside ``single_threaded_blas`` (the loader's threads featurise beside XLA),
    as it was set after it, and the batches are the loader's batches either way."""
    from threadpoolctl import threadpool_limits

    rows = read_manifest(manifest)
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        free = take(iter(Loader(rows, processor, batch_size=4, seed=7)), 6)
        with single_threaded_blas():
            assert blas_threads() == {1}
            one = take(iter(Loader(rows, processor, batch_size=4, seed=7)), 6)
        assert blas_threads() == {2}
    assert_same_batches(one, free)


def test_feature_cache_gives_the_same_batches_and_reads_each_file_once(manifest, processor, monkeypatch):
    import speechseq.data.loader as loader_module

    rows = read_manifest(manifest)
    reference = take(iter(Loader(rows, processor, batch_size=4, seed=3, num_workers=2)), 25)
    reads = Counter()
    real_load = loader_module.load_audio
    monkeypatch.setattr(loader_module, "load_audio", lambda path, rate: reads.update([path]) or real_load(path, rate))
    cached = Loader(rows, processor, batch_size=4, seed=3, num_workers=2, cache_gb=1.0)
    assert_same_batches(take(iter(cached), 25), reference)  # 2.5 epochs of 10 batches
    assert sorted(reads) == sorted({r.audio for r in rows}) and set(reads.values()) == {1}
    reads.clear()
    tiny = Loader(rows, processor, batch_size=4, seed=3, num_workers=0, cache_gb=1e-9)  # nothing fits: no cache
    assert_same_batches(take(iter(tiny), 25), reference)
    assert sum(reads.values()) == 100
    with pytest.raises(ConfigError, match="cache_gb"):
        Loader(rows, processor, batch_size=4, cache_gb=-1)


def test_a_row_two_workers_want_at_once_is_read_once(manifest, processor, monkeypatch):
    """A row in the last batch of one epoch and the first of the next is featurised by two workers at once: the
    second waits for the first's cache entry instead of reading the file again."""
    import threading
    import time

    import speechseq.data.loader as loader_module

    rows = read_manifest(manifest)
    reads = Counter()
    real_load = loader_module.load_audio

    def slow_load(path, rate):
        reads.update([path])
        time.sleep(0.3)  # the second worker arrives while the first is still reading
        return real_load(path, rate)

    monkeypatch.setattr(loader_module, "load_audio", slow_load)
    loader = Loader(rows, processor, batch_size=4, seed=3, cache_gb=1.0)
    samples = int(loader._samples.max())
    out = [None, None]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, loader._featurise(0, samples))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(reads.values()) == [1]
    assert out[0].keys() == out[1].keys() and all((out[0][k] == out[1][k]).all() for k in out[0])


@pytest.mark.parametrize("stop", [3, 9, 10, 23])  # mid-epoch, the epoch's last batch, its end, two epochs later
def test_state_restores_the_exact_continuation(manifest, processor, stop):
    rows = read_manifest(manifest)
    reference = take(iter(Loader(rows, processor, batch_size=4, seed=11, num_workers=2)), stop + 7)
    loader = Loader(rows, processor, batch_size=4, seed=11, num_workers=3)
    assert loader.batches_per_epoch == 10
    assert_same_batches(take(iter(loader), stop), reference[:stop])
    state = json.loads(json.dumps(loader.get_state()))
    assert (state["epoch"], state["batch"]) == divmod(stop, 10)
    resumed = Loader(rows, processor, batch_size=4, seed=999, num_workers=0)  # the saved seed wins
    resumed.set_state(state)
    assert_same_batches(take(iter(resumed), 7), reference[stop:])


def test_state_from_other_data_is_refused(manifest, processor):
    rows = read_manifest(manifest)
    state = Loader(rows, processor, batch_size=4).get_state()
    for other, needle in [(Loader(rows[:-1], processor, batch_size=4), "saved for other data or batching settings"),
                          (Loader(rows, processor, batch_size=8), "saved for other data or batching settings")]:
        with pytest.raises(InputError, match=needle):
            other.set_state(state)
    loader = Loader(rows, processor, batch_size=4)
    for bad in [None, {"version": 2}, {**state, "epoch": -1}, {**state, "batch": "3"}]:
        with pytest.raises((InputError, ConfigError), match="data state") as e:
            loader.set_state(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_concatenate_to_the_one_process_batch(manifest, processor, processes):
    rows = read_manifest(manifest)
    kwargs = dict(batch_size=8, seed=4, decoder_start_token_id=CLS, drop_remainder=False)
    whole = take(iter(Loader(rows, processor, **kwargs)), 12)  # 2 epochs of 5 batches, and more
    shards = [Loader(rows, processor, process_index=p, process_count=processes, num_workers=p, **kwargs)
              for p in range(processes)]
    parts = [take(iter(s), 12) for s in shards]
    for step, batch in enumerate(whole):
        local = [part[step] for part in parts]
        assert all(b["input_values"].shape[0] == 8 // processes for b in local)
        assert sum((b["ids"] for b in local), []) == batch["ids"]
        for key in batch.keys() - {"ids"}:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), batch[key])
    assert len({json.dumps(s.get_state()) for s in shards}) == 1
    evaluation = list(Loader(rows, processor, **kwargs).epoch())
    sharded = [list(s.epoch()) for s in shards]
    for k, batch in enumerate(evaluation):
        assert sum((part[k]["ids"] for part in sharded), []) == batch["ids"]
        np.testing.assert_array_equal(np.concatenate([part[k]["labels"] for part in sharded]), batch["labels"])


def test_every_row_once_per_epoch(manifest, processor):
    rows = read_manifest(manifest)
    ids = sorted(r.id for r in rows)
    dropping = Loader(rows, processor, batch_size=6)  # 40 rows: 6 batches, 4 rows left out per epoch
    epochs = [[i for b in take(iter(dropping), 6) for i in b["ids"]]]
    it = iter(dropping)
    epochs.append([i for b in take(it, 6) for i in b["ids"]])
    for seen in epochs:
        assert len(seen) == 36 and len(set(seen)) == 36 and set(seen) <= set(ids)
    assert set(epochs[0]) != set(epochs[1])  # a different tail each epoch
    keeping = Loader(rows, processor, batch_size=6, drop_remainder=False)
    assert keeping.batches_per_epoch == 7
    batches = take(iter(keeping), 7)
    seen = [i for b in batches for i in b["ids"]]
    assert sorted(i for i in seen if i is not None) == ids and seen.count(None) == 2
    padding = [(b, k) for b in batches for k, i in enumerate(b["ids"]) if i is None]
    assert all((b["labels"][k] == -100).all() and (b["attention_mask"][k] == 0).all() for b, k in padding)
    evaluation = list(dropping.epoch())
    seen = [i for b in evaluation for i in b["ids"]]
    assert sorted(i for i in seen if i is not None) == ids and len(evaluation) == 7
    lengths = [b["attention_mask"].sum(1).max() for b in evaluation]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    assert dropping.get_state()["epoch"] == 2  # epoch() leaves the training position (after 2 epochs) alone


def test_no_jax_import():
    import subprocess
    import sys

    code = "import sys, speechseq.data; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

