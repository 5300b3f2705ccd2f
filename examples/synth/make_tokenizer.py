"""The recogniser's tokenizer: a BPE learnt from the training sentences (make_data.py's default, 500 ids), or one
token per character of the synthesized data set's text, plus BERT's specials in both.

Ids: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3``, then ``▁`` (the space between words) 4, ``'`` 5 and ``a``-``z`` 6-31.
It is a `tokenizers` BPE model without merges, so every character is its own token, with a Metaspace pre-tokenizer
and decoder (the space is a token, written ``▁``; none is put before the first word), a Lowercase normalizer, and a
``[CLS] text [SEP]`` post-processor, as BERT's tokenizers give. So it pairs with a BERT-style decoder: ``[CLS]`` is
the decoder start token, ``[SEP]`` the end of sequence, ``[PAD]`` the padding; labels from ``encode`` (with the
leading ``[CLS]`` stripped) end in ``[SEP]``, which teaches the decoder to stop.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` (``tokenizer_class: PreTrainedTokenizerFast``), which
``speechseq.text.Tokenizer`` and ``transformers.AutoTokenizer`` both read as they are.

The BPE starts from that same alphabet and merges within words only (``tokenizers``' BpeTrainer); a word's first
piece carries its ``▁`` (Metaspace ``prepend_scheme="always"``), so fewer tokens (about 17 for the 42 characters of
an average sentence) each stand for a longer stretch of sound.

    python examples/synth/make_tokenizer.py OUT_DIR [--bpe 500 --sentences data/synth/train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from speechseq.checkpoints.storage import atomic_file, write_json

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
SPACE = "\u2581"  # "▁", Metaspace's mark for a space
CHARACTERS = (SPACE, "'", *string.ascii_lowercase)


def build_tokenizer(sentences: list[str] | None = None, vocab_size: int = 0) -> Tokenizer:
    """The character tokenizer described in the module docstring (32 ids), or with ``sentences`` and ``vocab_size``
    a BPE of ``vocab_size`` ids learnt from them (the same specials, characters and pre-tokenizer; merges never
    cross a word boundary, and a word-initial piece carries its ``▁``)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARACTERS)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    if sentences is not None:
        tok = Tokenizer(BPE(unk_token="[UNK]"))
    tok.add_special_tokens(list(SPECIALS))  # never split, and skipped by decode(skip_special_tokens=True)
    tok.normalizer = normalizers.Lowercase()
    # characters, "never": no "▁" before the first word, so "a b" is [a, ▁, b] and decodes back without a leading
    # space; BPE, "always": every word starts with "▁", so a word has the same pieces wherever it stands
    prepend = "never" if sentences is None else "always"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=prepend)
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme=prepend)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    if sentences is not None:
        from tokenizers.trainers import BpeTrainer

        trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=list(CHARACTERS),
                             limit_alphabet=len(CHARACTERS), show_progress=False)
        tok.train_from_iterator(sentences, trainer)
    return tok


def save_tokenizer(directory: str | os.PathLike, sentences: list[str] | None = None, vocab_size: int = 0) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / "tokenizer.json") as f:
        f.write(build_tokenizer(sentences, vocab_size).to_str(pretty=True))
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers then runs tokenizer.json as it is
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "clean_up_tokenization_spaces": False,  # its English contraction rules would rewrite "it ' s"-like text
        "model_max_length": 512,
        "padding_side": "right",
    })
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write tokenizer.json and tokenizer_config.json into")
    parser.add_argument("--bpe", type=int, default=0, metavar="N", help="a BPE of N ids (default 0: characters)")
    parser.add_argument("--sentences", metavar="JSONL", help="the manifest whose \"text\" fields the BPE learns from")
    args = parser.parse_args(argv)
    if bool(args.bpe) != bool(args.sentences):
        parser.error("--bpe and --sentences go together")
    sentences = None
    if args.sentences:
        with open(args.sentences, encoding="utf-8") as f:
            sentences = [json.loads(line)["text"] for line in f if line.strip()]
    print(save_tokenizer(args.out, sentences, args.bpe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
