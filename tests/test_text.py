"""speechseq.text.Tokenizer against transformers' own tokenizers, for every layout a speech checkpoint ships.

Each tokenizer is trained here on a small corpus, saved through the transformers class of its family, and (for the
old layouts) stripped of tokenizer.json so the vocab.txt / vocab.json+merges.txt / sentencepiece path is exercised.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from speechseq.errors import CheckpointError, InputError
from speechseq.text import MBartSentencePiece, Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
sentencepiece = pytest.importorskip("sentencepiece")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a test of speech recognition!",
    "She sells sea shells by the sea shore.",
    "I don't think it's going to rain today, is it?",
    "We're recording forty two short utterances in a quiet room.",
    "They've been waiting since nine o'clock for the train.",
    "A café in Zürich serves crème brûlée and naïve résumés.",
    "Numbers like 3.14, 2023 and 1,000,000 appear in transcripts.",
    "Can you hear me now? Yes, loud and clear.",
    "The speaker said: \"translate this sentence into German\".",
    "Speech translation maps audio in one language to text in another.",
    "Models are fine-tuned on thousands of hours of labelled audio.",
    "Please turn off the lights when you leave the room.",
    "He read the book; she wrote the review.",
    "It was the best of times, it was the worst of times.",
    "Neural networks learn representations from raw waveforms.",
    "Beam search keeps the four most likely hypotheses.",
    "Greedy decoding picks the most likely token at every step.",
    "The encoder turns sixteen kilohertz audio into hidden states.",
    "Cross attention lets the decoder look at the encoder output.",
    "You'll find the data set under the shared folder.",
    "Don't forget to normalise the transcripts before scoring.",
    "Word error rate counts substitutions, deletions and insertions.",
    "I'm sure we'll finish the experiment by Friday afternoon.",
    "The weather in Paris is mild in spring and warm in summer.",
    "Tokyo, Berlin, Lagos and Lima are large cities.",
    "Our dog barks at the postman every single morning.",
    "Mix two cups of flour with one cup of water.",
    "The committee approved the budget after a long debate.",
    "Children played in the park until the sun went down.",
    "中文 字符 are split one by one by the BERT normaliser.",
    "Tabs\tand  double  spaces should be handled consistently.",
]
TEXTS = CORPUS[:6] + ["", "  leading and trailing spaces  ", "UPPER case WORDS", "unseen wörds like qxzv ŋ"]


def train_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 3), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- builders
def build_bert(raw, out, **config):
    """A WordPiece vocab.txt trained on the corpus, saved through transformers' BertTokenizer."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, trainers

    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=config.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=250, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.model.save(str(raw))
    transformers.BertTokenizer.from_pretrained(raw, **config).save_pretrained(out)
    shutil.copy(raw / "vocab.txt", out / "vocab.txt")


def build_bpe(raw, out, cls_name, **config):
    """A byte-level BPE vocab.json + merges.txt, saved through transformers' GPT-2 / RoBERTa / BART class."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    gpt2 = cls_name == "GPT2Tokenizer"
    specials = ["<|endoftext|>"] if gpt2 else ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(raw))
    getattr(transformers, cls_name).from_pretrained(raw, **config).save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(raw / name, out / name)


def build_mbart(raw, out, tmp_path, **config):
    """A unigram sentencepiece model saved as mBART's sentencepiece.bpe.model through transformers' MBartTokenizer."""
    spm = sentencepiece.SentencePieceTrainer
    spm.train(input=str(train_text(tmp_path)), model_prefix=str(tmp_path / "spm"), vocab_size=200,
              model_type="unigram", minloglevel=2)
    shutil.copy(tmp_path / "spm.model", raw / "sentencepiece.bpe.model")
    transformers.MBartTokenizer.from_pretrained(raw, **config).save_pretrained(out)
    shutil.copy(raw / "sentencepiece.bpe.model", out / "sentencepiece.bpe.model")


FAMILIES = {
    "bert": lambda raw, out, tmp: build_bert(raw, out, clean_up_tokenization_spaces=True),
    "bert-cased": lambda raw, out, tmp: build_bert(raw, out, do_lower_case=False, strip_accents=True,
                                                   tokenize_chinese_chars=False),
    "gpt2": lambda raw, out, tmp: build_bpe(raw, out, "GPT2Tokenizer"),
    "roberta": lambda raw, out, tmp: build_bpe(raw, out, "RobertaTokenizer", add_prefix_space=True),
    "bart": lambda raw, out, tmp: build_bpe(raw, out, "BartTokenizer"),
    "mbart": lambda raw, out, tmp: build_mbart(raw, out, tmp),
    "mbart-de": lambda raw, out, tmp: build_mbart(raw, out, tmp, src_lang="de_DE"),
}
OLD_FILES = {"bert": "vocab.txt", "gpt2": "merges.txt", "roberta": "merges.txt", "bart": "merges.txt",
             "mbart": "sentencepiece.bpe.model"}


@pytest.fixture(scope="module", params=[(f, layout) for f in FAMILIES for layout in ("tokenizer.json", "old")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    """(ours, transformers') tokenizers loaded from the same saved directory."""
    family, layout = request.param
    tmp = tmp_path_factory.mktemp(family)
    raw, out = tmp / "raw", tmp / "out"
    raw.mkdir()
    FAMILIES[family](raw, out, tmp)
    if layout == "old":
        (out / "tokenizer.json").unlink()
        assert (out / OLD_FILES[family.split("-")[0]]).is_file()
    else:
        assert (out / "tokenizer.json").is_file()
    ours = Tokenizer.from_pretrained(out)
    assert isinstance(ours, MBartSentencePiece) == (family.startswith("mbart") and layout == "old")
    return ours, transformers.AutoTokenizer.from_pretrained(out)


def random_sequences(ours, rng, n=24, length=20):
    """Random id rows over the whole vocabulary, special tokens sprinkled in, eos then pad padding at the end."""
    special = ours.all_special_ids
    rows = []
    for _ in range(n):
        row = rng.integers(0, ours.vocab_size, size=length)
        spots = rng.random(length) < 0.15
        row[spots] = rng.choice(special, size=spots.sum())
        cut = int(rng.integers(1, length))
        if ours.eos_token_id is not None:
            row[cut] = ours.eos_token_id
            row[cut + 1:] = ours.pad_token_id if ours.pad_token_id is not None else ours.eos_token_id
        rows.append(row)
    return np.stack(rows)


# ------------------------------------------------------------------------------------------------- parity
def test_encode_matches_transformers(pair):
    ours, theirs = pair
    for text in CORPUS + TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text


def test_decode_random_ids_matches_transformers(pair):
    ours, theirs = pair
    seqs = random_sequences(ours, np.random.default_rng(0))
    for skip in (False, True):
        assert ours.batch_decode(seqs, skip_special_tokens=skip) == theirs.batch_decode(
            seqs.tolist(), skip_special_tokens=skip)


def test_decode_encoded_sentences_matches_transformers(pair):
    ours, theirs = pair
    batch = ours(CORPUS + TEXTS)
    for skip in (False, True):
        assert ours.batch_decode(batch["input_ids"], skip_special_tokens=skip) == theirs.batch_decode(
            batch["input_ids"].tolist(), skip_special_tokens=skip)
        for text in TEXTS:
            ids = theirs(text)["input_ids"]
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_vocabulary_and_special_tokens_match_transformers(pair):
    ours, theirs = pair
    assert ours.vocab_size == len(theirs)
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.unk_token_id == theirs.unk_token_id
    assert set(ours.all_special_ids) == set(theirs.all_special_ids)
    for name, token in ours.special_tokens.items():
        assert getattr(theirs, name) == token
    vocab = theirs.get_vocab()
    tokens = sorted(vocab)[:: max(1, len(vocab) // 50)] + ["definitely-not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids(tokens[0]) == theirs.convert_tokens_to_ids(tokens[0])
    if theirs.bos_token_id is not None:
        assert ours.bos_token_id == theirs.bos_token_id and ours.eos_token_id == theirs.eos_token_id
    else:  # BERT has no bos/eos; ours falls back to [CLS] / [SEP], the decoder start and end tokens
        assert (ours.bos_token_id, ours.eos_token_id) == (theirs.cls_token_id, theirs.sep_token_id)


def test_batch_and_labels(pair):
    ours, theirs = pair
    texts = CORPUS[:4]
    batch = ours(texts)
    pad = ours.pad_token_id if ours.pad_token_id is not None else ours.eos_token_id
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    if theirs.pad_token_id is not None:  # GPT-2 has none: transformers refuses to pad, ours pads with eos
        ref = theirs(texts, padding=True, return_tensors="np")
        np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    labels = ours.encode_labels(texts, pad_to=batch["input_ids"].shape[1] + 3)
    assert labels.shape == (4, batch["input_ids"].shape[1] + 3)
    expected = np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    np.testing.assert_array_equal(labels[:, :expected.shape[1]], expected)
    assert (labels[:, expected.shape[1]:] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    # labels decode like the ids they came from (-100 dropped)
    assert ours.batch_decode(labels, skip_special_tokens=True) == theirs.batch_decode(
        batch["input_ids"].tolist(), skip_special_tokens=True)
    first = ours.encode(texts[0])[0]
    stripped = ours.encode_labels(texts, strip_start_id=first)
    np.testing.assert_array_equal(stripped[0, :len(ours.encode(texts[0])) - 1], ours.encode(texts[0])[1:])
    with pytest.raises(InputError, match="pad_to=2 is shorter"):
        ours.encode_labels(texts, pad_to=2)


# ------------------------------------------------------------------------------------------------- bad input
def test_empty_directory_lists_files_looked_for(tmp_path):
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("tokenizer.json", "vocab.txt", "vocab.json + merges.txt", "sentencepiece.bpe.model"):
        assert name in msg


def test_corrupt_tokenizer_json_names_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece"', encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "tokenizer.json" in msg


def test_corrupt_tokenizer_config_names_file(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not a valid JSON file"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_sentencepiece_model_names_file(tmp_path):
    (tmp_path / "sentencepiece.bpe.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(err.value) and "sentencepiece.bpe.model" in str(err.value)


def test_bad_merges_names_file(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="merges.txt: every merge line"):
        Tokenizer.from_pretrained(tmp_path)


def test_unequal_lengths_without_padding(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n", encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("hello world") == [2, 5, 6, 3]
    assert tok(["hello", "hello"], padding=False)["input_ids"].tolist() == [[2, 5, 3]] * 2
    with pytest.raises(InputError, match="padding=True"):
        tok(["hello", "hello world"], padding=False)


# ------------------------------------------------------------------------------------------------- v4-era configs
def as_v4_config(out, extra=(), lstrip_mask=False, **overrides):
    """Rewrite ``out``'s tokenizer_config.json the way transformers 4.x wrote it: special tokens as serialised
    AddedToken dicts, an ``added_tokens_decoder`` table (with ``extra`` new tokens after the vocabulary), a
    special_tokens_map.json, ``clean_up_tokenization_spaces`` on, and ``overrides``."""
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    theirs = transformers.AutoTokenizer.from_pretrained(out)

    def added(content, special=True, lstrip=False, normalized=False):
        return {"content": content, "lstrip": lstrip, "normalized": normalized, "rstrip": False,
                "single_word": False, "special": special}

    table = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        if cfg.get(name):
            entry = added(cfg[name], lstrip=lstrip_mask and name == "mask_token")
            table[str(theirs.convert_tokens_to_ids(cfg[name]))] = entry
            cfg[name] = {"__type": "AddedToken", **{k: v for k, v in entry.items() if k != "special"}}
    for i, (content, special) in enumerate(extra):
        table[str(len(theirs) + i)] = added(content, special=special, normalized=not special)
    cfg.pop("backend", None)
    named = {v["content"] for v in table.values()}
    cfg["additional_special_tokens"] = [t for t in cfg.pop("extra_special_tokens", []) if t not in named] + [
        c for c, special in extra if special]  # mBART: its language codes
    cfg.update(added_tokens_decoder=table, clean_up_tokenization_spaces=True, model_max_length=512, **overrides)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    names = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, dict)}
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2))


@pytest.mark.parametrize("family", ["bert", "roberta", "bart", "gpt2", "mbart"])
def test_v4_style_config_with_added_tokens(family, tmp_path):
    (tmp_path / "raw").mkdir()
    FAMILIES[family](tmp_path / "raw", tmp_path / "out", tmp_path)
    (tmp_path / "out" / "tokenizer.json").unlink()
    extra = [] if family == "mbart" else [("[NEW]", False), ("<speaker>", True)]  # mBART: no added tokens
    overrides = {"gpt2": {"add_bos_token": True, "add_eos_token": True},
                 "bart": {"tokenizer_class": "BartTokenizer"}}.get(family, {})
    as_v4_config(tmp_path / "out", extra=extra, lstrip_mask=family in ("roberta", "mbart"), **overrides)
    ours, theirs = Tokenizer.from_pretrained(tmp_path / "out"), transformers.AutoTokenizer.from_pretrained(
        tmp_path / "out")
    assert ours.vocab_size == len(theirs)
    if family == "gpt2":
        assert ours.encode("hi")[0] == ours.encode("hi")[-1] == ours.bos_token_id
    if extra:
        tokens = ["[NEW]", "<speaker>"]
        assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
        assert ours.convert_tokens_to_ids("<speaker>") in ours.all_special_ids
    for text in ["hello [NEW] world <speaker> bye", "the <mask> dog", "the<mask>dog [MASK] don't , ok .",
                 "say en_XX now</s> a <s>b"]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    seqs = random_sequences(ours, np.random.default_rng(1))
    for skip in (False, True):
        assert ours.batch_decode(seqs, skip_special_tokens=skip) == theirs.batch_decode(
            seqs.tolist(), skip_special_tokens=skip)



def test_mbart_runs_sentencepiece_with_its_normalisation(tmp_path):
    """Ours runs sentencepiece itself, so its NFKC normalisation applies (as in fairseq): a ligature and full-width
    letters encode as their plain forms. transformers 5.25 converts a bare sentencepiece.bpe.model with the model's
    precompiled normaliser, so its ids agree with ours on normalised, unnormalised and mixed text."""
    (tmp_path / "raw").mkdir()
    build_mbart(tmp_path / "raw", tmp_path / "out", tmp_path)
    (tmp_path / "out" / "tokenizer.json").unlink()
    ours = Tokenizer.from_pretrained(tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert isinstance(ours, MBartSentencePiece) and ours.src_lang == "en_XX"
    text = "\ufb01ne \uff46\uff55\uff4c\uff4c width"  # "fi" ligature, full-width letters
    expected = [k + 1 for k in ours._sp.encode(text)] + [2, ours.convert_tokens_to_ids("en_XX")]
    assert ours.encode(text) == expected == ours.encode("fine full width")
    for sample in (text, "fine full width", "\u2460\u2461  a\u3000b \uff76\uff80\uff76\uff85 \u2122 caf\u00e9"):
        ids = ours.encode(sample)
        assert ids == theirs(sample)["input_ids"], sample
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------- padding blocks
LONG_TEXT = " ".join(" ".join(CORPUS * 2).split()[:300])  # 300 words: several hundred tokens


def with_padding_blocks(out, direction="right", pad_token=None):
    """Give ``out``'s tokenizer.json fixed padding to 128 and truncation at 128, as sentence-transformers'
    all-MiniLM-L6-v2 ships them."""
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    pad = pad_token or json.loads((out / "tokenizer_config.json").read_text())["pad_token"]
    tok.enable_padding(length=128, direction=direction, pad_id=tok.token_to_id(pad), pad_token=pad)
    tok.enable_truncation(128)
    tok.save(str(out / "tokenizer.json"))
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["padding"]["strategy"] == {"Fixed": 128} and saved["truncation"]["max_length"] == 128


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_tokenizer_json_padding_and_truncation_blocks_do_not_apply(family, tmp_path):
    """transformers encodes as if the blocks were absent: no padding to 128, no cut at 128; batches pad to the
    longest text; labels from `Processor` are -100 at padding only (a pad token written in the text stays)."""
    from speechseq import Processor

    (tmp_path / "raw").mkdir()
    FAMILIES[family](tmp_path / "raw", tmp_path / "out", tmp_path)
    with_padding_blocks(tmp_path / "out")
    ours, theirs = Tokenizer.from_pretrained(tmp_path / "out"), transformers.AutoTokenizer.from_pretrained(
        tmp_path / "out")
    for text in TEXTS + [LONG_TEXT]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert len(ours.encode(CORPUS[0])) < 128 < len(ours.encode(LONG_TEXT))
    ids = ours.encode(LONG_TEXT)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    texts = [CORPUS[0], f"{CORPUS[1]} {ours.special_tokens['pad_token']}", LONG_TEXT]
    batch, ref = ours(texts), theirs(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    labels = Processor.from_pretrained(tmp_path / "out")(text=texts)["labels"]
    np.testing.assert_array_equal(labels, np.where(ref["attention_mask"] == 1, ref["input_ids"], -100))
    assert (labels[1] == ours.pad_token_id).sum() == 1  # the written pad token is a label, not padding
    assert (labels[0] == -100).any() and not (labels[2] == -100).any()


def test_tokenizer_json_padding_side(tmp_path):
    """The padding block's direction is the pad side of a batch (tokenizer_config.json's padding_side over it), and
    a tokenizer.json alone takes its pad token from the block, as in transformers."""
    (tmp_path / "raw").mkdir()
    out = tmp_path / "out"
    FAMILIES["bert"](tmp_path / "raw", out, tmp_path)
    with_padding_blocks(out, direction="left")
    texts = [CORPUS[0], "hello"]
    for config_side in (None, "right"):
        if config_side:
            cfg = json.loads((out / "tokenizer_config.json").read_text())
            (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": config_side}))
        ours, theirs = Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
        assert ours.padding_side == theirs.padding_side == (config_side or "left")
        batch, ref = ours(texts), theirs(texts, padding=True, return_tensors="np")
        np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "middle"}))
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_pretrained(out)
    assert str(err.value) == f"{out / 'tokenizer_config.json'}: padding_side must be 'left' or 'right', got 'middle'"

    bare = tmp_path / "bare"  # GPT-2 has no pad token; the block names one
    (tmp_path / "raw2").mkdir()
    FAMILIES["gpt2"](tmp_path / "raw2", tmp_path / "gpt2", tmp_path)
    with_padding_blocks(tmp_path / "gpt2", direction="left", pad_token="<|endoftext|>")
    bare.mkdir()
    shutil.copy(tmp_path / "gpt2" / "tokenizer.json", bare / "tokenizer.json")
    ours, theirs = Tokenizer.from_pretrained(bare), transformers.AutoTokenizer.from_pretrained(bare)
    assert ours.pad_token_id == theirs.pad_token_id == ours.eos_token_id
    assert ours.padding_side == theirs.padding_side == "left"
    batch, ref = ours(texts), theirs(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    assert ours.encode(LONG_TEXT) == theirs(LONG_TEXT)["input_ids"]
