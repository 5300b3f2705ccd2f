"""Encoder families by input kind: an encoder reads raw audio (``input_values``, wav2vec2 and HuBERT) or features
(``input_features``); the public API, the pure functions and the processor pass each kind to an encoder that takes it
and refuse the other in one line. No features family ships yet, so a tiny one is registered here, only for these
tests: one linear projection of the features, written against ``registry.EncoderFamily``."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T

import hf_factory as F
from speechseq import InputError, SpeechSeq2Seq, registry
from speechseq import model as M
from speechseq.checkpoints.convert import describe_config
from speechseq.checkpoints.table import dense as dense_rules
from speechseq.config import (INT, REQUIRED, EncoderConfig, HFField, config_from_dict, encoder_config_from_hf,
                              hf_dict_field, read_fields)
from speechseq.encoders import wav2vec2
from speechseq.processor import Processor

FEATURES = 6  # channels per feature frame


@dataclass(frozen=True)
class TinyConfig(EncoderConfig):
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    input_size: int
    hf: dict = hf_dict_field()


class TinyFeatures:
    """A features encoder family: frames [B, S, F] -> hidden_size by one dense layer, the mask passed through."""

    INPUT_KIND = "features"
    Config = TinyConfig
    FIELDS = (HFField("hidden_size", "hidden_size", REQUIRED, INT),
              HFField("num_layers", "num_hidden_layers", 1, INT),
              HFField("num_heads", "num_attention_heads", 1, INT),
              HFField("input_size", "input_feat_per_channel", REQUIRED, INT))

    @staticmethod
    def parse_config(hf: dict, where: str) -> TinyConfig:
        return TinyConfig(model_type=hf["model_type"], **read_fields(hf, TinyFeatures.FIELDS, where), hf=hf)

    @staticmethod
    def weight_rules(cfg: TinyConfig):
        return dense_rules("{base}proj", "proj", cfg.input_size, cfg.hidden_size, ("conv_out", "embed"))

    @staticmethod
    def encode(cfg, p, inputs, mask, *, rng=None, dtype=jnp.float32, remat="none"):
        if inputs.ndim != 3 or inputs.shape[-1] != cfg.input_size:
            raise InputError(f"input_features: expected [batch, frames, {cfg.input_size}], got {inputs.shape}")
        return inputs.astype(dtype) @ p["proj"]["kernel"] + p["proj"]["bias"], TinyFeatures.frame_mask(
            cfg, mask, inputs.shape[1])

    @staticmethod
    def frame_mask(cfg, mask, num_frames):
        return None if mask is None else mask.astype(bool)


class TinyExtractor:
    """A feature extractor making ``input_features`` (what a filterbank extractor returns): here frames of
    FEATURES consecutive samples."""

    INPUT_KIND = "features"

    def __call__(self, audios, sampling_rate=None, padding="longest"):
        frames = [np.asarray(a, np.float32)[: len(a) // FEATURES * FEATURES].reshape(-1, FEATURES) for a in audios]
        n = max(len(f) for f in frames)
        out = np.zeros((len(frames), n, FEATURES), np.float32)
        mask = np.zeros((len(frames), n), np.int32)
        for i, f in enumerate(frames):
            out[i, : len(f)], mask[i, : len(f)] = f, 1
        return {"input_features": out, "attention_mask": mask}


@pytest.fixture
def tiny(monkeypatch) -> SpeechSeq2Seq:
    """A features encoder + BERT decoder from a config, with the tiny family registered for this test only."""
    monkeypatch.setitem(registry.FAMILIES, "tiny-features", registry.encoder("tiny-features", TinyFeatures, ("",)))
    cfg = {"model_type": "speech-encoder-decoder", "decoder_start_token_id": 0, "pad_token_id": 1,
           "encoder": {"model_type": "tiny-features", "hidden_size": 16, "num_attention_heads": 2,
                       "input_feat_per_channel": FEATURES},
           "decoder": F.decoder_config("bert").to_dict()}
    return SpeechSeq2Seq.from_config(cfg, seed=3)


@pytest.fixture(scope="module")
def w2v() -> SpeechSeq2Seq:
    return SpeechSeq2Seq.from_config(T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        F.encoder_config("w2v-group"), F.decoder_config("bert")).to_dict() | {"decoder_start_token_id": 0,
                                                                              "pad_token_id": 1})


def features_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 9, FEATURES)).astype(np.float32)
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    x[1, 6:] = 0
    return x, mask


def projected(model: SpeechSeq2Seq, x: np.ndarray) -> np.ndarray:
    """The tiny encoder's frames computed in numpy from its params."""
    p = model.params["encoder"]["proj"]
    return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------- wrong kind


def test_waveform_encoder_refuses_features(w2v):
    x, mask = F.audio_batch()
    feats = np.zeros((2, 9, FEATURES), np.float32)
    want = "input_features: the wav2vec2 encoder takes input_values (raw audio [batch, samples])"
    calls = [lambda: w2v(input_features=feats, decoder_input_ids=np.zeros((2, 3), np.int32)),
             lambda: w2v(x, mask, input_features=feats, decoder_input_ids=np.zeros((2, 3), np.int32)),
             lambda: w2v.encode(input_features=feats),
             lambda: w2v.generate(input_features=feats, max_new_tokens=2),
             lambda: M.forward(w2v.config, w2v.params, input_features=feats, labels=np.zeros((2, 3), np.int32))]
    for call in calls:
        with pytest.raises(InputError) as e:
            call()
        assert one_line(e) == want


def test_features_encoder_refuses_audio(tiny):
    x, mask = F.audio_batch()
    want = "input_values: the tiny-features encoder takes input_features (features [batch, frames, features])"
    for call in (lambda: tiny(x, mask, decoder_input_ids=np.zeros((2, 3), np.int32)), lambda: tiny.encode(x, mask),
                 lambda: tiny.generate(x, mask, max_new_tokens=2)):
        with pytest.raises(InputError) as e:
            call()
        assert one_line(e) == want
    for call in (lambda: tiny(decoder_input_ids=np.zeros((2, 3), np.int32)), lambda: tiny.generate()):
        with pytest.raises(InputError) as e:
            call()
        assert one_line(e).startswith("input_features: required")
    with pytest.raises(InputError) as e:
        tiny.encode(input_features=np.zeros((2, 9), np.float32))
    assert one_line(e) == ("input_features: expected rank 3: features [batch, frames, features], got shape (2, 9)")


# ---------------------------------------------------------------------------------------------------- features flow


def test_features_reach_the_encoder(tiny):
    """encode, forward and the object's call run the registered family on input_features with their mask."""
    x, mask = features_batch()
    frames = projected(tiny, x)
    enc = tiny.encode(input_features=x, attention_mask=mask)
    np.testing.assert_allclose(enc.last_hidden_state, frames, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(enc.attention_mask, mask.astype(bool))
    labels = F.tokens(2, 5)
    out = tiny(input_features=x, attention_mask=mask, labels=labels)
    # the same decoder over the frames given as precomputed encoder output
    want = M.forward(tiny.config, tiny.params, encoder_outputs=M.EncoderOutput(jnp.asarray(frames), jnp.asarray(
        mask.astype(bool))), labels=labels)
    np.testing.assert_allclose(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.loss, want.loss, rtol=1e-5)
    pure = M.forward_jit(tiny.config, tiny.params, attention_mask=mask, labels=labels, input_features=x)
    np.testing.assert_array_equal(pure.logits, out.logits)
    assert describe_config(tiny.config)["encoder"] == "tiny-features: 1 layers, hidden 16, heads 2"
    assert encoder_config_from_hf(tiny.config.encoder.to_dict()) == tiny.config.encoder
    assert config_from_dict(tiny.config.to_dict()) == tiny.config


def test_generate_reads_features(tiny):
    """generate on input_features gives the greedy tokens of the teacher-forced model over the same frames."""
    x, mask = features_batch(1)
    got = tiny.generate(input_features=x, attention_mask=mask, max_new_tokens=3)
    frames = M.EncoderOutput(jnp.asarray(projected(tiny, x)), jnp.asarray(mask.astype(bool)))
    ids = np.zeros((2, 1), np.int64)
    done = np.zeros(2, bool)
    for _ in range(3):
        logits = np.asarray(tiny(encoder_outputs=frames, decoder_input_ids=ids).logits)[:, -1]
        nxt = np.where(done, tiny.config.pad_token_id, logits.argmax(-1))
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        done |= nxt == tiny.config.eos_token_id
        if done.all():
            break
    np.testing.assert_array_equal(got, ids)


def test_processor_output_flows_to_the_matching_encoder(tiny, w2v):
    """``model(**processor(audio=...))``: a features extractor's output reaches the features encoder, and the
    wav2vec2 extractor's output is refused by it (and the other way round), naming the argument."""
    audio = [np.random.default_rng(0).normal(size=n).astype(np.float32) for n in (1600, 1100)]
    features = Processor(TinyExtractor(), None)
    assert features.input_kind == "features"
    batch = features(audio=audio)
    out = tiny(**batch, decoder_input_ids=np.zeros((2, 3), np.int32))
    want = tiny(input_features=batch["input_features"], attention_mask=batch["attention_mask"],
                decoder_input_ids=np.zeros((2, 3), np.int32))
    np.testing.assert_array_equal(out.logits, want.logits)
    with pytest.raises(InputError, match="^input_features: the wav2vec2 encoder takes input_values"):
        w2v(**batch, decoder_input_ids=np.zeros((2, 3), np.int32))
    from speechseq.audio import FeatureExtractor

    waveform = Processor(FeatureExtractor(return_attention_mask=True), None)
    assert waveform.input_kind == "waveform"
    with pytest.raises(InputError, match="^input_values: the tiny-features encoder takes input_features"):
        tiny(**waveform(audio=audio), decoder_input_ids=np.zeros((2, 3), np.int32))
    w2v(**waveform(audio=audio), decoder_input_ids=np.zeros((2, 3), np.int32))


def test_registry_declares_kinds():
    assert {n: f.input_kind for n, f in registry.FAMILIES.items() if f.role == "encoder"} == {
        "wav2vec2": "waveform", "hubert": "waveform", "unispeech": "waveform", "unispeech-sat": "waveform",
        "data2vec-audio": "waveform", "wavlm": "waveform", "wav2vec2-conformer": "waveform", "sew": "waveform",
        "sew-d": "waveform",
        "speech_to_text": "features"}
    assert registry.family("hubert", "encoder").config_class is wav2vec2.Wav2Vec2Config
    with pytest.raises(ValueError, match="INPUT_KIND 'spectrogram'"):
        registry.encoder("bad", type("Bad", (TinyFeatures,), {"INPUT_KIND": "spectrogram"}), ("",))
