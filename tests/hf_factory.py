"""Tiny random transformers models for parity tests: every encoder variant and decoder family, with perturbed
parameters (HF init leaves norms at 1 and biases at 0, which would hide mapping mistakes)."""

from __future__ import annotations

import inspect

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
    if name in MORE_DECODERS:
        return MORE_DECODERS[name](hidden, tie)
    raise KeyError(name)


DECODERS = ["bert", "roberta", "gpt2", "gpt2-scaled", "bart", "bart-scaled", "mbart"]

# The decoder families of issue 30 (tests/test_more_decoders.py): name -> config builder (hidden, tie)
_SEQ2SEQ_DEC = dict(decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=24, encoder_layers=2,
                    encoder_attention_heads=2, encoder_ffn_dim=24, max_position_embeddings=40, dropout=0.0,
                    attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2,
                    forced_eos_token_id=None, **DEC_COMMON)


def _BERT_DEC(hidden: int, tie: bool) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                tie_word_embeddings=tie, **DEC_COMMON)



def _TROCR(tie: bool) -> dict:
    return dict(decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=24, max_position_embeddings=40,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=tie,
                activation_function="relu", **DEC_COMMON)


MORE_DECODERS = {
    "marian": lambda hidden, tie: T.MarianConfig(d_model=hidden, scale_embedding=True, tie_word_embeddings=tie,
                                                 **_SEQ2SEQ_DEC),
    "pegasus": lambda hidden, tie: T.PegasusConfig(d_model=hidden, scale_embedding=True, tie_word_embeddings=tie,
                                                   **_SEQ2SEQ_DEC),
    "blenderbot-small": lambda hidden, tie: T.BlenderbotSmallConfig(d_model=hidden, scale_embedding=True,
                                                                    tie_word_embeddings=tie, **_SEQ2SEQ_DEC),
    "xglm": lambda hidden, tie: T.XGLMConfig(d_model=hidden, num_layers=2, attention_heads=2, ffn_dim=24,
                                             max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
                                             activation_dropout=0.0, tie_word_embeddings=tie, **DEC_COMMON),
    # learned positions with an embedding norm; sinusoidal (padding-aware) positions, scaled, without the norm
    "trocr": lambda hidden, tie: T.TrOCRConfig(d_model=hidden, layernorm_embedding=True, **_TROCR(tie)),
    "trocr-sinusoidal": lambda hidden, tie: T.TrOCRConfig(d_model=hidden, use_learned_position_embeddings=False,
                                                          layernorm_embedding=False, scale_embedding=True,
                                                          **_TROCR(tie)),
    "xlm-roberta": lambda hidden, tie: T.XLMRobertaConfig(**_BERT_DEC(hidden, tie)),
    "electra": lambda hidden, tie: T.ElectraConfig(embedding_size=hidden, hidden_act="relu", **_BERT_DEC(hidden, tie)),
    "bert-generation": lambda hidden, tie: T.BertGenerationConfig(**_BERT_DEC(hidden, tie)),
}


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


# ----------------------------------------------------------------------------------------------------------------------
# Shared by test_parity, test_roundtrip and test_warm_start (the builders above are unchanged)

EXTRA_ENCODERS = {
    # name: (base variant in ENCODERS, overrides). An adapter whose output width (20) differs from the encoder's
    # (16) and equals the default decoder width: transformers sizes enc_to_dec_proj from the encoder's hidden_size
    # and so crashes on "w2v-adapter" (24 wide) with a 20-wide decoder, but runs this one (no projection needed).
    "w2v-adapter-20": ("w2v-adapter", dict(output_hidden_size=20)),
}


def any_encoder_config(name: str, **overrides):
    """``encoder_config`` for a name in ENCODERS or EXTRA_ENCODERS, with optional field overrides."""
    base, extra = EXTRA_ENCODERS.get(name, (name, {}))
    cls, kw = ENCODERS[base]
    return cls(**{**ENC_BASE, **kw, **extra, **overrides})


def seq2seq_from_configs(enc_config, dec_config, seed: int = 0):
    """A perturbed ``SpeechEncoderDecoderModel`` from two transformers configs (as ``seq2seq`` builds it)."""
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc_config, dec_config)
    cfg.decoder_start_token_id = 0
    cfg.pad_token_id = 1
    torch.manual_seed(seed)
    return perturb(T.SpeechEncoderDecoderModel(cfg), seed)


def any_seq2seq(enc: str, dec: str, dec_hidden: int = 20, tie: bool = True, seed: int = 0):
    """``seq2seq`` that also accepts the EXTRA_ENCODERS names."""
    return seq2seq_from_configs(any_encoder_config(enc), decoder_config(dec, dec_hidden, tie), seed)


def to_numpy(x) -> np.ndarray:
    """A torch tensor or jax/numpy array as a numpy array (bfloat16 through float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def hf_forward(model: torch.nn.Module, **inputs):
    """Run a transformers model under ``no_grad``; numpy inputs become tensors, ``None`` inputs are left out."""
    args = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        return model(**args)


def max_abs_diff(a, b) -> float:
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def assert_same_state_dict(got: dict, want: dict) -> None:
    """Same keys, and every tensor bit-identical (numpy arrays are compared as tensors)."""
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    for name, value in want.items():
        other = got[name]
        other = other if isinstance(other, torch.Tensor) else torch.from_numpy(np.array(other))
        assert other.dtype == value.dtype and torch.equal(other, value), name


# ----------------------------------------------------------------------------------------------------------------------
# Shared by test_generate and test_sampling

def _is_cross_attention_weight(name: str) -> bool:
    cross = "crossattention" in name or "encoder_attn." in name
    norm = any(s in name for s in ("LayerNorm", "layer_norm", "ln_"))
    return cross and not norm


def decoding_seq2seq(enc: str, dec: str, cross_scale: float = 10.0, seed: int = 0, dec_hidden: int = 20):
    """``any_seq2seq`` with cross-attention weights multiplied by ``cross_scale``: the perturbed tiny models otherwise
    decode nearly the same tokens whatever the audio, and decoding tests need rows that differ (EOS at different
    steps) and tokens that vary along a row."""
    model = any_seq2seq(enc, dec, dec_hidden=dec_hidden, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_cross_attention_weight(name):
                p.mul_(cross_scale)
    return model


def hf_generate(model, x, mask, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    """transformers' ``generate`` on audio [B, N] with its mask: (sequences, sequences_scores or None)."""
    with torch.no_grad():
        out = model.generate(input_values=torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    scores = getattr(out, "sequences_scores", None)
    return out.sequences.numpy(), None if scores is None else scores.numpy()


def pick_eos(tokens: np.ndarray, exclude=(0, 1), steps=(2, 3, 4, 5)) -> int:
    """A token for ``eos_token_id`` from greedy output [B, T] generated without it (column 0 the start token): one
    that some row (row 0 preferred) first emits at one of ``steps`` (1-based generated position) and at which not
    all rows would stop at the same step. Falls back to any token some row first emits after its first position."""
    gen = np.asarray(tokens)[:, 1:]

    def first(row, t):
        hits = np.flatnonzero(row == t)
        return int(hits[0]) + 1 if hits.size else None

    candidates = dict.fromkeys(t for row in gen for t in row.tolist() if t not in exclude)  # row 0's first
    fallback = None
    for t in candidates:
        stops = [first(row, t) for row in gen]
        early = [s for s in stops if s is not None]
        if min(early) in steps and len(set(stops)) > 1:
            return int(t)
        if fallback is None and max(early) > 1:
            fallback = int(t)
    if fallback is None:
        raise AssertionError(f"no usable EOS token in greedy output {gen.tolist()}")
    return fallback


def amplify_cross_attention(model, query: float = 8.0, value: float = 5.0):
    """Make a random decoder listen to the audio: sharper cross-attention and a louder cross-attention path
    (tiny random models otherwise emit the same tokens for every utterance)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("cross" in name or "encoder_attn" in name) and "bias" not in name:
                p.mul_(query if any(s in name for s in ("query", "q_attn", "q_proj")) else value)
    return model


def wordpiece_checkpoint(path, enc: str = "w2v-layer-stable", dec: str = "gpt2", filterbank: bool = False):
    """A tiny HF checkpoint with a WordPiece tokenizer (ids match the decoder: [CLS]=0 start, [PAD]=1, [SEP]=2 eos)
    and a feature extractor that returns attention masks; returns the transformers model. ``filterbank``: a
    Speech2Text encoder with its filterbank feature extractor instead of ``enc``."""
    import transformers as T

    words = ["hello", "world", "the", "quick", "brown", "fox", "speech", "to", "text", "in", "jax", "a", "b", "c"]
    vocab = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] + words
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    T.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(path)
    if filterbank:
        T.Speech2TextFeatureExtractor(return_attention_mask=True).save_pretrained(path)
        model = amplify_cross_attention(speech_to_text_seq2seq(dec))
    else:
        T.Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True).save_pretrained(path)
        model = amplify_cross_attention(seq2seq(enc, dec))
    model.config.eos_token_id = 2
    model.save_pretrained(path)
    return model


import contextlib  # noqa: E402  (kept with the helper that uses it)


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread: on a loaded 2-core machine its OpenMP threads make a tiny model's ``generate``
    ~100x slower (3 s instead of 0.03 s); the previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------------
# The encoder families of issue 30 (tests/test_more_encoders.py): name -> (config class, kwargs over ENC_BASE).
# WavLM with few buckets (16 over 40 frames) so that ~80 frames reach the exact, log-spaced and capped buckets.

MORE_ENCODERS = {
    "unispeech": (T.UniSpeechConfig, dict(feat_extract_norm="group", do_stable_layer_norm=False)),
    "unispeech-sat": (T.UniSpeechSatConfig, dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                                                 mask_time_prob=0.0)),  # SAT keeps masked_spec_embed regardless
    # an even kernel (4) drops a frame after each positional conv; 3 of them
    "data2vec-audio": (T.Data2VecAudioConfig, dict(num_conv_pos_embeddings=3, conv_pos_kernel_size=4, conv_bias=True)),
    "data2vec-audio-adapter": (T.Data2VecAudioConfig, dict(num_conv_pos_embeddings=2, conv_pos_kernel_size=5,
                                                           add_adapter=True, output_hidden_size=20,
                                                           num_adapter_layers=2)),
    "wavlm": (T.WavLMConfig, dict(feat_extract_norm="group", do_stable_layer_norm=False, num_buckets=16,
                                  max_bucket_distance=40)),
    "wavlm-stable": (T.WavLMConfig, dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                                         num_buckets=16, max_bucket_distance=40)),
}


def more_encoder_config(name: str, **overrides):
    """The transformers config of a MORE_ENCODERS variant, with optional field overrides."""
    cls, kw = MORE_ENCODERS[name]
    return cls(**{**ENC_BASE, **kw, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# Speech2Text's filterbank encoder (tests/test_speech_to_text.py): transformers builds it only as a module of its own
# (``Speech2TextEncoder``), which ``SpeechEncoderDecoderModel(encoder=..., decoder=...)`` takes. A short position table
# (32 rows) so that the fixtures' ~48 frames grow it, as transformers does past max_source_positions.

SPEECH_TO_TEXT = dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=20, num_conv_layers=2,
                      conv_kernel_sizes=(5, 3), conv_channels=12, input_feat_per_channel=80, max_source_positions=32,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                      decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=8, vocab_size=VOCAB)


def speech_to_text_config(**overrides):
    """A tiny ``Speech2TextConfig`` (its decoder fields matter only to the standalone Speech2Text classes)."""
    return T.Speech2TextConfig(**{**SPEECH_TO_TEXT, **overrides})


def speech_to_text_seq2seq(dec: str, dec_hidden: int = 20, tie: bool = True, seed: int = 0, **overrides):
    """A perturbed ``SpeechEncoderDecoderModel`` with a ``Speech2TextEncoder`` and a ``decoder_config(dec)`` decoder."""
    from transformers.models.speech_to_text.modeling_speech_to_text import Speech2TextEncoder

    torch.manual_seed(seed)
    decoder = T.AutoModelForCausalLM.from_config(decoder_config(dec, dec_hidden, tie))
    model = T.SpeechEncoderDecoderModel(encoder=Speech2TextEncoder(speech_to_text_config(**overrides)), decoder=decoder)
    model.config.decoder_start_token_id = 0
    model.config.pad_token_id = 1
    return perturb(model, seed)


def checkpoint_zoo(tmp_path_factory, build):
    """What a module-scoped ``zoo`` fixture returns: ``get(*args, **kwargs)`` -> (the transformers model
    ``build(*args, **kwargs)``, the speechseq model loaded from its saved checkpoint with no tensor missing or left
    over), each built once per distinct arguments (defaults filled in)."""
    from speechseq import SpeechSeq2Seq

    signature, cache = inspect.signature(build), {}

    def get(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = tuple(bound.arguments.values())
        if key not in cache:
            hf = build(*bound.args, **bound.kwargs)
            path = tmp_path_factory.mktemp("-".join(map(str, key)))
            hf.save_pretrained(path)
            ours = SpeechSeq2Seq.from_pretrained(path)
            assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
            cache[key] = hf, ours
        return cache[key]

    return get
