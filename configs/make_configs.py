"""Regenerate the demo configs in this folder from ``transformers`` config classes (needs the test extras).

    python configs/make_configs.py

Each file is exactly ``SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec).to_dict()`` after setting
``decoder_start_token_id`` and ``pad_token_id``: nothing trimmed, so it is what transformers itself writes.
"""

from __future__ import annotations

from pathlib import Path

import transformers as T

from speechseq.checkpoints.storage import write_json

HERE = Path(__file__).resolve().parent

# The real wav2vec2 feature encoder: 7 convs, total stride 320 (one frame per 20 ms at 16 kHz), receptive field 400.
CONV = dict(conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))


def wav2vec2_bert() -> T.SpeechEncoderDecoderConfig:
    """wav2vec2-base shape, narrowed: group-norm conv stack, post-norm layers; BERT decoder of the same width."""
    enc = T.Wav2Vec2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                           conv_dim=(128,) * 7, conv_bias=False, feat_extract_norm="group",
                           do_stable_layer_norm=False, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                           vocab_size=32, **CONV)
    dec = T.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=1024, max_position_embeddings=256, is_decoder=True, add_cross_attention=True,
                       pad_token_id=0, bos_token_id=101, eos_token_id=102)
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = 101
    cfg.pad_token_id = 0
    cfg.eos_token_id = 102
    return cfg


def hubert_gpt2() -> T.SpeechEncoderDecoderConfig:
    """hubert-large shape, narrowed: layer-norm conv stack with bias, stable (pre-norm) layers; a wider GPT-2
    decoder, so the model has an ``enc_to_dec_proj`` (192 -> 256)."""
    enc = T.HubertConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                         conv_dim=(128,) * 7, conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                         feat_proj_layer_norm=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                         vocab_size=32, **CONV)
    dec = T.GPT2Config(vocab_size=1000, n_embd=256, n_layer=3, n_head=4, n_positions=256, add_cross_attention=True,
                       bos_token_id=999, eos_token_id=999, pad_token_id=999)
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = 999
    cfg.pad_token_id = 999
    cfg.eos_token_id = 999
    return cfg


def main() -> None:
    for name, make in (("demo-wav2vec2-bert", wav2vec2_bert), ("demo-hubert-gpt2", hubert_gpt2)):
        path = HERE / f"{name}.json"
        write_json(path, make().to_dict())
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
