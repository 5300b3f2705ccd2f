"""The untrained recogniser that ``examples/synth/train.toml`` trains: a small Speech2Text encoder on 80 log-mel
filterbanks (three stride-2 conv + GLU layers: 12.5 frames a second, 6 pre-norm transformer layers of width 192)
joined to a 3-layer mBART decoder (pre-norm), randomly initialised, saved with the data set's tokenizer (BPE or
characters), its feature extractor and its generation settings; 5.08 M parameters. The mBART decoder learns to
attend faster than a post-norm BERT one at this learning rate (train.toml, validation WER / CER after 3,000 steps:
68.2% / 51.2% against 84.6% / 63.8%). Frames of 80 ms still outnumber the
BPE tokens about two to one at the fastest speech, and make a training step 1.7x faster than 40 ms ones
(``--conv-layers 2``). Five decoder layers (``--decoder-layers 5``, 6.3 M parameters, 24 MiB) cost 16% more a step,
so that 32,500 steps fill the 2 hours instead of 38,000, and read `test` no better (14.1% WER, against 12.9% for three
layers and 38,000 steps). ``--encoder wav2vec2`` makes a wav2vec2-style encoder on the raw waveform instead (layer-norm
conv feature encoder, stable layer norm, SpecAugment): from scratch it learns far more slowly (train.toml, batch 16:
validation loss 1.86 / 1.64 after 800 / 1,200 steps, against the filterbank encoder's 1.18 / 0.76 after 1,000 /
2,000).

    python examples/synth/make_model.py data/synth/tokenizer data/synth/init

The folder is a complete checkpoint (``speechseq train`` fine-tunes it with ``model.init``); it is written whole or
not at all, and an existing folder is never replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ENCODER = dict(
    model_type="wav2vec2", hidden_size=192, num_hidden_layers=6, num_attention_heads=4, intermediate_size=768,
    hidden_act="gelu", conv_dim=[64, 64, 96, 96, 128, 128, 128], conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
    num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16, feat_proj_layer_norm=True,
    hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.05,
    apply_spec_augment=True, mask_time_prob=0.05, mask_time_length=5, mask_time_min_masks=2, mask_feature_prob=0.0,
)
SPEECH_TO_TEXT = dict(
    model_type="speech_to_text", d_model=192, encoder_layers=6, encoder_attention_heads=4, encoder_ffn_dim=768,
    activation_function="relu", num_conv_layers=2, conv_kernel_sizes=[5, 5], conv_channels=256,
    input_feat_per_channel=80, input_channels=1, max_source_positions=1024, scale_embedding=True, pad_token_id=1,
    dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.0,
)
FBANK = dict(feature_extractor_type="Speech2TextFeatureExtractor", feature_size=80, num_mel_bins=80,
             sampling_rate=16000, padding_value=0.0, do_ceptral_normalize=True, normalize_means=True,
             normalize_vars=True, return_attention_mask=True, padding_side="right")
DECODER = dict(
    model_type="bert", hidden_size=192, num_hidden_layers=3, num_attention_heads=4, intermediate_size=768,
    max_position_embeddings=128, type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    is_decoder=True, add_cross_attention=True, tie_word_embeddings=True,
)
# mBART's decoder: pre-norm layers (and a norm after the embeddings and the last layer), which keep a high
# learning rate stable where BERT's post-norm ones learn to attend more slowly
MBART_DECODER = dict(
    model_type="mbart", d_model=192, decoder_layers=3, decoder_attention_heads=4, decoder_ffn_dim=768,
    encoder_layers=0, max_position_embeddings=128, activation_function="gelu", dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.0, decoder_layerdrop=0.0, scale_embedding=False, is_decoder=True, add_cross_attention=True,
    tie_word_embeddings=True, forced_eos_token_id=None,
)
FEATURES = dict(feature_extractor_type="Wav2Vec2FeatureExtractor", feature_size=1, sampling_rate=16000,
                padding_value=0.0, do_normalize=True, return_attention_mask=True, padding_side="right")


def make_model(tokenizer_dir: Path, out: Path, seed: int = 0, encoder: str = "speech_to_text",
               decoder: str = "mbart", conv_layers: int = 3, decoder_layers: int = 3) -> Path:
    """Writes the untrained checkpoint into ``out`` (which must not exist) and returns it; ``encoder``:
    "speech_to_text" (filterbanks) or "wav2vec2" (raw waveform); ``decoder``: "bert" (post-norm) or "mbart"
    (pre-norm); ``conv_layers``: the filterbank encoder's stride-2 convolutions (2: 25 frames a second, 3: 12.5);
    ``decoder_layers``: the decoder's depth."""
    from speechseq import SpeechSeq2Seq
    from speechseq.checkpoints.storage import atomic_dir, check_destination, write_json
    from speechseq.errors import InputError

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    ids = {token: vocab[token] for token in ("[PAD]", "[CLS]", "[SEP]")}
    dec = {**(MBART_DECODER if decoder == "mbart" else DECODER), "vocab_size": len(vocab), "pad_token_id": ids["[PAD]"]}
    dec["decoder_layers" if decoder == "mbart" else "num_hidden_layers"] = decoder_layers
    if decoder == "mbart":
        dec.update(bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"], decoder_start_token_id=ids["[CLS]"])
    config = {"model_type": "speech-encoder-decoder", "is_encoder_decoder": True,
              "encoder": ({**SPEECH_TO_TEXT, "num_conv_layers": conv_layers, "conv_kernel_sizes": [5] * conv_layers}
                          if encoder == "speech_to_text" else ENCODER), "decoder": dec,
              "decoder_start_token_id": ids["[CLS]"], "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"]}
    check_destination(out, force=False)
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise InputError(f"{tokenizer_dir}: no tokenizer_config.json (make it with examples/synth/make_tokenizer.py)")
    model = SpeechSeq2Seq.from_config(config, seed=seed)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp / name).write_bytes((tokenizer_dir / name).read_bytes())
        write_json(tmp / "preprocessor_config.json", FBANK if encoder == "speech_to_text" else FEATURES)
        # beam search (4 beams) that never repeats a 3-token sequence: a decoder this small, trained this briefly,
        # loses its place in the audio now and then and loops over what it just said (transformers honours it too);
        # 4 beams read the test sets 2-3 WER points better than greedy (the training loop validates greedily)
        write_json(tmp / "generation_config.json", {
            "decoder_start_token_id": ids["[CLS]"], "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"],
            "max_length": 100, "no_repeat_ngram_size": 3, "num_beams": 4})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", type=Path, help="the data set's tokenizer folder (data/synth/tokenizer)")
    parser.add_argument("out", type=Path, help="the checkpoint folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", choices=["speech_to_text", "wav2vec2"], default="speech_to_text",
                        help="filterbank Speech2Text encoder (default) or raw-waveform wav2vec2")
    parser.add_argument("--decoder", choices=["bert", "mbart"], default="mbart",
                        help="mBART (pre-norm, default) or BERT (post-norm) decoder")
    parser.add_argument("--conv-layers", type=int, choices=[2, 3], default=3,
                        help="stride-2 convolutions of the filterbank encoder: 3 (12.5 frames a second, default) or "
                             "2 (25)")
    parser.add_argument("--decoder-layers", type=int, default=3, help="the decoder's layers (default 3)")
    args = parser.parse_args(argv)
    from speechseq.errors import SpeechSeqError

    try:
        print(make_model(args.tokenizer, args.out, args.seed, args.encoder, args.decoder, args.conv_layers,
                         args.decoder_layers))
    except SpeechSeqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
