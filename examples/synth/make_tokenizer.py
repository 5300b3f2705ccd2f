"""The recogniser's tokenizer: one token per character of the synthesized data set's text, plus BERT's specials.

Ids: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3``, then ``▁`` (the space between words) 4, ``'`` 5 and ``a``-``z`` 6-31.
It is a `tokenizers` BPE model without merges, so every character is its own token, with a Metaspace pre-tokenizer
and decoder (the space is a token, written ``▁``; none is put before the first word), a Lowercase normalizer, and a
``[CLS] text [SEP]`` post-processor, as BERT's tokenizers give. So it pairs with a BERT-style decoder: ``[CLS]`` is
the decoder start token, ``[SEP]`` the end of sequence, ``[PAD]`` the padding; labels from ``encode`` (with the
leading ``[CLS]`` stripped) end in ``[SEP]``, which teaches the decoder to stop.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` (``tokenizer_class: PreTrainedTokenizerFast``), which
``speechseq.text.Tokenizer`` and ``transformers.AutoTokenizer`` both read as they are.

    python examples/synth/make_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import argparse
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


def build_tokenizer() -> Tokenizer:
    """The character tokenizer described in the module docstring (32 ids)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARACTERS)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.add_special_tokens(list(SPECIALS))  # never split, and skipped by decode(skip_special_tokens=True)
    tok.normalizer = normalizers.Lowercase()
    # "never": no "▁" before the first word, so "a b" is [a, ▁, b] and decodes back without a leading space
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def save_tokenizer(directory: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / "tokenizer.json") as f:
        f.write(build_tokenizer().to_str(pretty=True))
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
    args = parser.parse_args(argv)
    print(save_tokenizer(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
