"""Text tokenizers shipped with speech checkpoints, without torch or transformers.

`Tokenizer.from_pretrained(directory)` reads the first layout it finds, in this order:

1. ``tokenizer.json`` (the `tokenizers` library's own file),
2. ``vocab.txt``: BERT WordPiece (``do_lower_case``, ``tokenize_chinese_chars``, ``strip_accents`` honoured),
3. ``vocab.json`` + ``merges.txt``: byte-level BPE, GPT-2 style (no added tokens) or RoBERTa / BART style
   (``<s> ... </s>``),
4. ``sentencepiece.bpe.model``: mBART, with fairseq's ids (``<s>=0 <pad>=1 </s>=2 <unk>=3``, sentencepiece ids
   shifted by one, language codes and ``<mask>`` after them); encodes ``text </s> src_lang`` like transformers.

Layouts 2 and 3 are rebuilt with `tokenizers` the way transformers converts them, so ids and decoded strings match
transformers' tokenizers. ``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json`` supply the
special tokens, added tokens, ``clean_up_tokenization_spaces`` and ``padding_side``. As in transformers, the
``padding`` and ``truncation`` blocks of a tokenizer.json (sentence-transformers writes fixed 128-token padding and
truncation at 128) do not apply when encoding; the padding block gives the pad side (and, in a tokenizer.json without
tokenizer_config.json, the pad token).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from speechseq.errors import CheckpointError, InputError, first_line

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LAYOUTS = ("tokenizer.json", "vocab.txt", "vocab.json + merges.txt", "sentencepiece.bpe.model")

BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                 "mask_token": "[MASK]"}
ROBERTA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                    "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
GPT2_SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
MBART_LANGUAGES = ("ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN", "it_IT",
                   "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO", "ru_RU", "si_LK",
                   "tr_TR", "vi_VN", "zh_CN")


def _read_json(path: Path) -> dict:
    """A JSON object from ``path`` ({} when absent); a one-line `CheckpointError` naming the file when unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid JSON file ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _content(token: Any) -> str | None:
    """The text of a special token written as a string or as a serialised AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _added_token(token: Any, special: bool) -> AddedToken:
    """An `AddedToken` from a string or a serialised AddedToken dict (its flags kept)."""
    if isinstance(token, dict):
        flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
        return AddedToken(token["content"], special=token.get("special", special), **flags)
    return AddedToken(token, special=special, normalized=not special)


class Tokenizer:
    """A text tokenizer: `encode`, batched `__call__`, `encode_labels`, `decode`, `batch_decode`.

    Wraps a `tokenizers.Tokenizer` (layouts 1-3); `MBartSentencePiece` subclasses it for sentencepiece files.
    """

    def __init__(self, backend: tokenizers.Tokenizer | None, special_tokens: dict[str, str],
                 additional_special_tokens: Sequence[str] = (), clean_up_tokenization_spaces: bool = False,
                 padding_side: str = "right"):
        self._backend = backend
        self._special = {k: v for k, v in special_tokens.items() if v is not None}
        self._additional = list(additional_special_tokens)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.padding_side = padding_side  # where `__call__` pads a batch: "right" or "left"

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer in a checkpoint directory (or hub id); see the module docstring for the layouts."""
        from speechseq.hub import resolve

        path = resolve(name_or_path)
        config = _read_json(path / "special_tokens_map.json")
        config = {**_read_json(path / "tokenizer_config.json"), **config}
        config["added_tokens_json"] = _read_json(path / "added_tokens.json")
        if (path / "tokenizer.json").is_file():
            tok = _from_tokenizer_json(path / "tokenizer.json", config)
        elif (path / "vocab.txt").is_file():
            tok = _from_wordpiece(path / "vocab.txt", config)
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = _from_byte_level_bpe(path / "vocab.json", path / "merges.txt", config)
        elif (path / "sentencepiece.bpe.model").is_file():
            tok = MBartSentencePiece.from_file(path / "sentencepiece.bpe.model", config)
        else:
            raise CheckpointError(f"{path}: no tokenizer found; looked for {', '.join(LAYOUTS)}")
        side = config.get("padding_side") or tok.padding_side  # tokenizer_config.json over tokenizer.json
        if side not in ("left", "right"):
            raise CheckpointError(f"{path / 'tokenizer_config.json'}: padding_side must be 'left' or 'right', "
                                  f"got {side!r}")
        tok.padding_side = side
        return tok

    # ----------------------------------------------------------------------------------------------- vocabulary
    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens, e.g. ``{"bos_token": "<s>", "eos_token": "</s>", ...}`` (unset ones left out)."""
        return dict(self._special)

    @property
    def additional_special_tokens(self) -> list[str]:
        """Special tokens without a name (mBART language codes, user-added ones)."""
        return list(self._additional)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named and additional special tokens, without repeats."""
        tokens = list(self._special.values()) + self._additional
        return list(dict.fromkeys(i for i in (self._token_to_id(t) for t in tokens) if i is not None))

    def _special_id(self, *names: str) -> int | None:
        for name in names:
            if name in self._special:
                return self._token_to_id(self._special[name])
        return None

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token (None when there is none, e.g. GPT-2)."""
        return self._special_id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token; BERT-style tokenizers (no eos) give their [SEP]."""
        return self._special_id("eos_token", "sep_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token; BERT-style tokenizers (no bos) give their [CLS]."""
        return self._special_id("bos_token", "cls_token")

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token."""
        return self._special_id("unk_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token (or ids of a list of tokens); unknown tokens give `unk_token_id`."""
        if isinstance(tokens, str):
            found = self._token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    # ----------------------------------------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the special tokens transformers adds (e.g. ``[CLS] ... [SEP]``)."""
        return self._backend.encode(text).ids

    def __call__(self, texts: str | Sequence[str], padding: bool = True) -> dict[str, np.ndarray]:
        """Encode a batch: ``input_ids`` [B, T] int32, padded with the pad token (eos, then 0, when there is none)
        on `padding_side`, and ``attention_mask`` [B, T] int32 (1 = token). ``padding=False`` needs equal
        lengths."""
        ids = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        if not padding and len({len(x) for x in ids}) > 1:
            raise InputError("texts encode to different lengths; pass padding=True")
        pad = next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)
        left = self.padding_side == "left"
        input_ids = _pad(ids, pad, None, left)
        mask = _pad([[1] * len(x) for x in ids], 0, None, left)
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode_labels(self, texts: Sequence[str], pad_to: int | None = None,
                      strip_start_id: int | None = None) -> np.ndarray:
        """Training labels [B, T] int32: `encode` of each text, right-padded with -100 (ignored by the loss);
        a pad token written in the text stays a label, as transformers' collators keep every attended token.

        ``pad_to`` fixes T (a shape bucket; a longer text raises `InputError`). ``strip_start_id`` drops that id
        where it starts a sequence, as transformers' speech seq2seq collators do for the decoder start token
        (the model prepends it again when it shifts labels right).
        """
        ids = [self.encode(t) for t in texts]
        if strip_start_id is not None:
            ids = [x[1:] if x and x[0] == strip_start_id else x for x in ids]
        return _pad(ids, -100, pad_to)

    # ----------------------------------------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids, as transformers' ``decode`` gives it. Negative ids (label padding) are
        dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if i >= 0]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._backend.model).__name__ != "BPE":
            text = clean_up_tokenization(text)  # transformers skips this for BPE models: it corrupts them
        return text

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """`decode` of each row of ``sequences`` ([B, T] array or list of lists)."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special_tokens={self._special})"


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop spaces before punctuation and English contractions."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def _pad(rows: list[list[int]], value: int, length: int | None, left: bool = False) -> np.ndarray:
    """Pad ``rows`` with ``value`` to ``length`` (default: the longest row) as an int32 [B, T] array, on the right
    (``left=True``: on the left)."""
    longest = max((len(r) for r in rows), default=0)
    length = longest if length is None else length
    if longest > length:
        raise InputError(f"pad_to={length} is shorter than the longest encoded text ({longest} tokens)")
    out = np.full((len(rows), length), value, dtype=np.int32)
    for b, row in enumerate(rows):
        if left:
            out[b, length - len(row):] = row
        else:
            out[b, :len(row)] = row
    return out


# --------------------------------------------------------------------------------------------------- layouts
def _special_tokens(config: dict, defaults: dict[str, str]) -> dict[str, Any]:
    """Named special tokens: the config's (string or AddedToken dict) over the layout's defaults."""
    out: dict[str, Any] = dict(defaults)
    for name in SPECIAL_NAMES:
        if name in config:
            out[name] = config[name]
    return {k: v for k, v in out.items() if _content(v) is not None}


def _additional(config: dict) -> list[Any]:
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    return list(extra.values()) if isinstance(extra, dict) else list(extra)


def _finish(backend: tokenizers.Tokenizer, config: dict, defaults: dict[str, str],
            extra: Sequence[Any] = ()) -> tuple[dict[str, str], list[str]]:
    """Register the config's added tokens and all special tokens on ``backend`` like transformers does; return the
    named special tokens and the additional ones as strings."""
    def present() -> set[str]:
        return {t.content for t in backend.get_added_tokens_decoder().values()}

    added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
    for _, token in sorted(added.items()):  # in id order, so new tokens get the ids the config gives them
        if _content(token) not in present():
            backend.add_tokens([_added_token(token, special=False)])
    for token, _ in sorted(config.get("added_tokens_json", {}).items(), key=lambda kv: kv[1]):  # added_tokens.json
        if token not in present():
            backend.add_tokens([token])
    specials = _special_tokens(config, defaults)
    extra_names = {_content(t) for t in extra}
    additional = list(extra) + [t for t in _additional(config) if _content(t) not in extra_names]
    have = present()
    new = [_added_token(t, special=True) for t in list(specials.values()) + additional if _content(t) not in have]
    if new:
        backend.add_special_tokens(new)
    return {k: _content(v) for k, v in specials.items()}, [_content(t) for t in additional]


def _load_backend(load, path: Path) -> Any:
    try:
        return load()
    except Exception as e:  # tokenizers raises plain Exception on malformed files
        raise CheckpointError(f"{path}: cannot read tokenizer file ({first_line(e)})") from None


def _guess_specials(backend: tokenizers.Tokenizer) -> dict[str, str]:
    """Defaults for a bare tokenizer.json (no tokenizer_config.json): pick the conventional names it contains."""
    vocab = backend.get_vocab(with_added_tokens=True)
    for defaults in (BERT_SPECIALS, ROBERTA_SPECIALS, GPT2_SPECIALS):
        if all(t in vocab for t in defaults.values()):
            return defaults
    return {}


def _from_tokenizer_json(path: Path, config: dict) -> Tokenizer:
    backend = _load_backend(lambda: tokenizers.Tokenizer.from_file(str(path)), path)
    # transformers encodes without the file's padding and truncation (it pads or truncates only when a call asks);
    # the padding block still gives the pad side, and the pad token when no config names special tokens
    padding = backend.padding or {}
    backend.no_padding()
    backend.no_truncation()
    defaults: dict[str, str] = {}
    if not any(n in config for n in SPECIAL_NAMES):
        defaults = _guess_specials(backend)
        if padding.get("pad_token"):
            defaults = {**defaults, "pad_token": padding["pad_token"]}
    specials, additional = _finish(backend, config, defaults)
    return Tokenizer(backend, specials, additional, bool(config.get("clean_up_tokenization_spaces", False)),
                     padding.get("direction", "right"))


def _read_wordpiece_vocab(path: Path) -> dict[str, int]:
    """vocab.txt as transformers reads it: one token a line (only the newline stripped), id = line number."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read vocabulary ({first_line(e)})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise CheckpointError(f"{path}: empty vocabulary")
    return {token: i for i, token in enumerate(lines)}


def _from_wordpiece(path: Path, config: dict) -> Tokenizer:
    vocab = _read_wordpiece_vocab(path)
    specials = _special_tokens(config, BERT_SPECIALS)
    unk = _content(specials.get("unk_token", "[UNK]"))
    backend = tokenizers.Tokenizer(WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    specials, additional = _finish(backend, config, BERT_SPECIALS)
    cls, sep = specials.get("cls_token"), specials.get("sep_token")
    if cls is not None and sep is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
    return Tokenizer(backend, specials, additional, bool(config.get("clean_up_tokenization_spaces", False)))


def _from_byte_level_bpe(vocab_path: Path, merges_path: Path, config: dict) -> Tokenizer:
    vocab = _read_json(vocab_path)
    try:
        merges = [tuple(line.split(" ")) for line in merges_path.read_text(encoding="utf-8").split("\n")
                  if line and not line.startswith("#version")]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{merges_path}: cannot read merges ({first_line(e)})") from None
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{merges_path}: every merge line must hold two tokens separated by one space")
    model = _load_backend(lambda: BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                      end_of_word_suffix="", fuse_unk=False), vocab_path)
    backend = tokenizers.Tokenizer(model)
    prefix = bool(config.get("add_prefix_space", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    backend.decoder = decoders.ByteLevel()
    gpt2_style = str(config.get("tokenizer_class", "")).startswith("GPT2") or (
        "tokenizer_class" not in config and "<|endoftext|>" in vocab and "<s>" not in vocab)
    specials, additional = _finish(backend, config, GPT2_SPECIALS if gpt2_style else ROBERTA_SPECIALS)
    if gpt2_style:
        # GPT-2 adds nothing unless the config asks for bos / eos (transformers' update_post_processor)
        bos = specials.get("bos_token") if config.get("add_bos_token") else None
        eos = specials.get("eos_token") if config.get("add_eos_token") else None
        if bos or eos:
            single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
            backend.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=[(t, backend.token_to_id(t)) for t in {bos, eos} if t])
    else:
        cls, sep = specials["cls_token"], specials["sep_token"]
        backend.post_processor = processors.RobertaProcessing(
            (sep, backend.token_to_id(sep)), (cls, backend.token_to_id(cls)),
            trim_offsets=bool(config.get("trim_offsets", True)), add_prefix_space=prefix)
    return Tokenizer(backend, specials, additional, bool(config.get("clean_up_tokenization_spaces", False)))


# --------------------------------------------------------------------------------------------------- mBART
class MBartSentencePiece(Tokenizer):
    """mBART's sentencepiece tokenizer with fairseq ids, run by `sentencepiece` itself.

    Ids: ``<s>=0 <pad>=1 </s>=2 <unk>=3``, sentencepiece piece ``k`` (k >= 3) at ``k + 1``, then the 25 mBART
    language codes, then ``<mask>``. `encode` gives ``pieces </s> src_lang`` (``src_lang`` from
    tokenizer_config.json, default ``en_XX``), as transformers' ``MBartTokenizer`` does.
    """

    def __init__(self, processor: Any, special_tokens: dict[str, str], src_lang: str = "en_XX",
                 clean_up_tokenization_spaces: bool = False):
        super().__init__(None, special_tokens, MBART_LANGUAGES, clean_up_tokenization_spaces)
        self._sp = processor
        size = processor.get_piece_size()
        fairseq = ["<s>", "<pad>", "</s>", "<unk>"]
        self._id_to_token = fairseq + [processor.id_to_piece(k) for k in range(3, size)]
        self._id_to_token += list(MBART_LANGUAGES) + [special_tokens.get("mask_token", "<mask>")]
        self._token_to_id_map = {t: i for i, t in enumerate(self._id_to_token)}
        self._special_ids = set(range(4)) | set(range(size + 1, len(self._id_to_token)))
        specials = sorted((self._id_to_token[i] for i in self._special_ids), key=len, reverse=True)
        self._split_special = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        if src_lang not in self._token_to_id_map:
            raise CheckpointError(f"src_lang={src_lang!r} is not an mBART language code ({', '.join(MBART_LANGUAGES)})")
        self.src_lang = src_lang

    @classmethod
    def from_file(cls, path: Path, config: dict) -> MBartSentencePiece:
        """Load ``sentencepiece.bpe.model``; ``config`` is tokenizer_config.json merged with special_tokens_map."""
        import sentencepiece

        name = str(config.get("tokenizer_class", "MBartTokenizer"))
        if not name.startswith("MBartTokenizer"):
            raise CheckpointError(f"{path}: sentencepiece tokenizers are supported for mBART only, "
                                  f"tokenizer_config.json names {name}")
        processor = sentencepiece.SentencePieceProcessor()
        _load_backend(lambda: processor.LoadFromSerializedProto(path.read_bytes()), path)
        specials = {k: _content(v) for k, v in _special_tokens(config, ROBERTA_SPECIALS).items()}
        return cls(processor, specials, config.get("src_lang") or "en_XX",
                   bool(config.get("clean_up_tokenization_spaces", False)))

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def _token_to_id(self, token: str) -> int | None:
        return self._token_to_id_map.get(token)

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self._split_special.split(text):  # special tokens written in the text stay whole
            if chunk in self._token_to_id_map and self._token_to_id_map[chunk] in self._special_ids:
                ids.append(self._token_to_id_map[chunk])
            elif chunk:
                ids += [3 if k == self._sp.unk_id() else k + 1 for k in self._sp.encode(chunk, out_type=int)]
        return ids + [2, self._token_to_id_map[self.src_lang]]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Runs of sentencepiece ids are decoded by sentencepiece; special tokens are written as themselves, and a
        run after the first token keeps its leading space (as the Metaspace decoder of transformers does)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < len(self._id_to_token)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        parts: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = self._sp.decode([i - 1 for i in run])
                if parts and self._id_to_token[run[0]].startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run.clear()

        for i in ids:
            if i in self._special_ids:
                flush()
                parts.append(self._id_to_token[i])
            else:
                run.append(i)
        flush()
        text = "".join(parts)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text
