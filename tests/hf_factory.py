"""Tiny random transformers models for parity tests: every encoder variant and decoder family, with perturbed
parameters (HF init leaves norms at 1 and biases at 0, which would hide mapping mistakes)."""

from __future__ import annotations

import numpy as np
import torch
import transformers as T

VOCAB = 61

ENCODERS = {
    # name: (config class, kwargs)
    "w2v-group": (T.Wav2Vec2Config, dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)),
    "w2v-layer-stable": (T.Wav2Vec2Config, dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "w2v-layer-post": (T.Wav2Vec2Config, dict(feat_extract_norm="layer", do_stable_layer_norm=False, conv_bias=True)),
    "w2v-oddpos": (T.Wav2Vec2Config, dict(num_conv_pos_embeddings=7)),
    "w2v-adapter": (T.Wav2Vec2Config, dict(add_adapter=True, output_hidden_size=24, num_adapter_layers=2,
                                          adapter_stride=2, feat_extract_norm="layer", do_stable_layer_norm=True)),
    "w2v-adapter-same": (T.Wav2Vec2Config, dict(add_adapter=True, num_adapter_layers=1, adapter_stride=3)),
    "hubert": (T.HubertConfig, dict(feat_proj_layer_norm=True)),
    "hubert-noprojnorm": (T.HubertConfig, dict(feat_proj_layer_norm=False, feat_extract_norm="layer",
                                               do_stable_layer_norm=True, conv_bias=True)),
}

ENC_BASE = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20,
                conv_dim=(8, 12, 12), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=8,
                num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                feat_proj_dropout=0.0, layerdrop=0.0, final_dropout=0.0)


def encoder_config(name: str):
    cls, kw = ENCODERS[name]
    return cls(**{**ENC_BASE, **kw})


DEC_COMMON = dict(vocab_size=VOCAB, is_decoder=True, add_cross_attention=True, pad_token_id=1, bos_token_id=0,
                  eos_token_id=2)


def decoder_config(name: str, hidden: int = 20, tie: bool = True):
    if name in ("bert", "roberta"):
        cls = T.BertConfig if name == "bert" else T.RobertaConfig
        return cls(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                   max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   tie_word_embeddings=tie, **DEC_COMMON)
    if name in ("gpt2", "gpt2-scaled"):
        return T.GPT2Config(n_embd=hidden, n_layer=2, n_head=2, n_positions=40, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=name == "gpt2-scaled",
                            reorder_and_upcast_attn=name == "gpt2-scaled", tie_word_embeddings=tie, **DEC_COMMON)
    if name in ("bart", "mbart", "bart-scaled"):
        cls = T.MBartConfig if name == "mbart" else T.BartConfig
        return cls(d_model=hidden, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=24, encoder_layers=2,
                   encoder_attention_heads=2, encoder_ffn_dim=24, max_position_embeddings=40, dropout=0.0,
                   attention_dropout=0.0, activation_dropout=0.0, scale_embedding=name != "bart",
                   tie_word_embeddings=tie, decoder_start_token_id=2, forced_eos_token_id=None, **DEC_COMMON)
    raise KeyError(name)


DECODERS = ["bert", "roberta", "gpt2", "gpt2-scaled", "bart", "bart-scaled", "mbart"]


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def seq2seq(enc: str, dec: str, dec_hidden: int = 20, tie: bool = True, seed: int = 0):
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config(enc),
                                                                    decoder_config(dec, dec_hidden, tie))
    cfg.decoder_start_token_id = 0
    cfg.pad_token_id = 1
    torch.manual_seed(seed)
    return perturb(T.SpeechEncoderDecoderModel(cfg), seed)


def audio_batch(lengths=(1600, 1100), seed: int = 0):
    """Padded audio [B, N] float32 and sample mask [B, N] int32."""
    rng = np.random.default_rng(seed)
    n = max(lengths)
    x = np.zeros((len(lengths), n), np.float32)
    mask = np.zeros((len(lengths), n), np.int32)
    for i, L in enumerate(lengths):
        x[i, :L] = rng.normal(0, 1, L)
        mask[i, :L] = 1
    return x, mask


def tokens(batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed + 1)
    return rng.integers(3, VOCAB, size=(batch, length)).astype(np.int64)
