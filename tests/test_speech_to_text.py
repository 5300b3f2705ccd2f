"""Speech2Text's filterbank path against transformers 5.25: ``Speech2TextFeatureExtractor`` (Kaldi fbank + utterance
CMVN, transformers' numpy path) on the real speech fixtures, alone and as padded batches; the ``speech_to_text``
encoder family as the encoder of a tiny perturbed ``SpeechEncoderDecoderModel`` (``Speech2TextEncoder`` + a BART
or BERT decoder): logits and loss on padded features with their mask and without one, gradients equal to
``loss.backward()``, greedy and beam tokens, convert-then-export bit for bit, config write-back, warm start from
standalone Speech2Text checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from transformers.models.speech_to_text.modeling_speech_to_text import Speech2TextEncoder

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.audio import FeatureExtractor, load_audio
from speechseq.checkpoints.convert import convert, export
from speechseq.config import encoder_config_from_hf
from speechseq.errors import ConfigError, InputError
from speechseq.fbank import Speech2TextFeatureExtractor
from speechseq.processor import Processor
from speechseq.training.step import loss_and_grad
from test_config_roundtrip import check_written
from test_parity import assert_depends_on_audio, assert_parity
from test_training_step import assert_grads_match_torch, EVAL_MODE, hf_named
from test_warm_start import build_decoder, check_part, load_state

FIXTURES = Path(__file__).parent / "fixtures"
# float32 features of unit scale: a few ulps (the numpy operations are transformers', so they agree to the bit here)
FEATURE_TOL = 1e-5
START, PAD, NEW = 0, 1, 8
BEAM = dict(num_beams=3, num_return_sequences=2, early_stopping=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    """The three spoken fixtures (1.2 s to 1.9 s), 16 kHz float32."""
    return [load_audio(f) for f in sorted(FIXTURES.glob("*.wav"))]


def hf_features(waves, **call) -> dict:
    with F.one_torch_thread():
        out = T.Speech2TextFeatureExtractor(**call.pop("init", {}))(waves, sampling_rate=16000, return_tensors="np",
                                                                  **call)
    return dict(out)


# ---- feature extractor -----------------------------------------------------------------------------------------------


def test_features_of_each_utterance(waves):
    ours = Speech2TextFeatureExtractor()
    for w in waves:
        want = hf_features(w)
        got = ours(w)
        assert got["input_features"].shape == want["input_features"].shape == (1, 1 + (len(w) - 400) // 160, 80)
        assert got["input_features"].dtype == np.float32
        assert F.max_abs_diff(got["input_features"], want["input_features"]) <= FEATURE_TOL
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])


@pytest.mark.parametrize("init", [{}, dict(normalize_vars=False), dict(normalize_means=False),
                                  dict(do_ceptral_normalize=False, padding_value=-1.0), dict(num_mel_bins=40,
                                                                                             feature_size=40)])
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_padded_batch(waves, init, padding):
    """CMVN over each utterance's real frames, padding set to padding_value, the int32 frame mask."""
    length = dict(max_length=210) if padding == "max_length" else {}
    want = hf_features(waves, init=init, padding=padding, **length)
    got = Speech2TextFeatureExtractor(**init)(waves, padding=padding, **length)
    assert got["input_features"].shape == want["input_features"].shape
    assert F.max_abs_diff(got["input_features"], want["input_features"]) <= FEATURE_TOL
    assert got["attention_mask"].dtype == want["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    assert (got["attention_mask"] == 0).any()  # the batch is padded


def test_buckets_and_no_mask(waves):
    """padding="buckets" pads to a bucket's frames with the same values; without a mask CMVN still uses the real
    frames (transformers fails on padding without a mask)."""
    ours = Speech2TextFeatureExtractor()
    longest = ours(waves)
    bucketed = ours(waves, padding="buckets")
    assert bucketed["input_features"].shape[1] == 1 + (32000 - 400) // 160  # the 2 s bucket
    np.testing.assert_array_equal(bucketed["input_features"][:, : longest["input_features"].shape[1]],
                                  longest["input_features"])
    unmasked = ours(waves, return_attention_mask=False)
    assert list(unmasked) == ["input_features"]
    np.testing.assert_array_equal(unmasked["input_features"], longest["input_features"])


def test_processor_picks_it_and_config_round_trips(tmp_path):
    T.Speech2TextFeatureExtractor(normalize_vars=False, padding_value=0.5).save_pretrained(tmp_path / "hf")
    processor = Processor.from_pretrained(tmp_path / "hf", require_tokenizer=False)
    fe = processor.feature_extractor
    assert isinstance(fe, Speech2TextFeatureExtractor) and processor.input_kind == "features"
    assert not fe.normalize_vars and fe.padding_value == 0.5
    assert FeatureExtractor.from_pretrained(tmp_path / "hf") == fe
    fe.save_pretrained(tmp_path / "ours")
    written, theirs = (json.loads((tmp_path / d / "preprocessor_config.json").read_text()) for d in ("ours", "hf"))
    assert written == theirs
    assert T.Speech2TextFeatureExtractor.from_pretrained(tmp_path / "ours").to_dict() == \
        T.Speech2TextFeatureExtractor.from_pretrained(tmp_path / "hf").to_dict()


def test_bad_input_is_one_line():
    fe = Speech2TextFeatureExtractor()
    with pytest.raises(InputError, match=r"^audios\[0\]: 399 samples is too short; a filterbank frame needs 400"):
        fe(np.zeros(399, np.float32))
    with pytest.raises(InputError, match=r"^audios: 7 frames do not fit max_length 5 "):
        fe(np.zeros(1400, np.float32), padding="max_length", max_length=5)
    with pytest.raises(ConfigError, match=r"^preprocessor_config.json: field 'dither' must be 0 "):
        Speech2TextFeatureExtractor.from_dict({"dither": 4.0})
    with pytest.raises(ConfigError, match=r"^preprocessor_config.json: feature_extractor_type "
                                          r"'WhisperFeatureExtractor' is not supported"):
        FeatureExtractor.from_dict({"feature_extractor_type": "WhisperFeatureExtractor"})


# ---- encoder family --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(waves) -> tuple[np.ndarray, np.ndarray]:
    """transformers' padded features of the three fixtures [3, 192, 80] and their frame mask [3, 192]."""
    out = hf_features(waves, padding="longest")
    return out["input_features"], out["attention_mask"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model with a BART decoder, speechseq model from its checkpoint)."""
    hf = F.speech_to_text_seq2seq("bart")
    path = tmp_path_factory.mktemp("s2t")
    hf.save_pretrained(path)
    ours = SpeechSeq2Seq.from_pretrained(path)
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    assert ours.config.encoder.model_type == "speech_to_text"
    return hf, ours


def labels3() -> np.ndarray:
    labels = F.tokens(3, 7)
    labels[1, 5:] = -100
    return labels


def test_logits_and_loss(pair, batch):
    """Padded features with their mask (the positions skip padding frames), then without a mask."""
    hf, ours = pair
    x, mask = batch
    labels = labels3()
    want = F.hf_forward(hf, input_features=x, attention_mask=mask, labels=labels)
    got = ours(input_features=x, attention_mask=mask, labels=labels)
    assert_parity(got, want, with_loss=True)
    assert got.encoder_last_hidden_state.shape[1] == 48  # 192 frames through two stride-2 convs
    unmasked = F.hf_forward(hf, input_features=x, labels=labels)
    got_unmasked = ours(input_features=x, labels=labels)
    assert_parity(got_unmasked, unmasked, with_loss=True)
    assert_depends_on_audio(np.asarray(got.logits), np.asarray(got_unmasked.logits)[::-1].copy())


def test_loss_and_grads_match_pytorch(pair, batch):
    """Padded features: the loss and every gradient equal ``loss.backward()``, judged as test_training_step judges
    them (1e-5 of the tensor's largest gradient, or a few times torch's own fp32 noise floor against float64)."""
    hf, ours = pair
    x, mask = batch
    labels = labels3().astype(np.int32)
    data = {"input_features": x, "attention_mask": mask, "labels": labels}
    loss, _, grads = jax.jit(lambda p, b: loss_and_grad(ours.config, EVAL_MODE, p, {}, b))(ours.params, data)

    def backward(model: torch.nn.Module) -> tuple[float, dict[str, np.ndarray]]:
        model.zero_grad()
        out = model(input_features=torch.from_numpy(x).to(next(model.parameters()).dtype),
                    attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels).long())
        out.loss.backward()
        return out.loss.item(), {n: p.grad.double().numpy() for n, p in model.named_parameters()}

    want_loss, want = backward(hf)
    _, exact = backward(copy.deepcopy(hf).double())
    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
    got = hf_named(ours.config, grads)
    assert sorted(got) == sorted(want)  # every trainable tensor of transformers, no other
    assert_grads_match_torch(got, want, exact)
    assert np.abs(got["encoder.conv.conv_layers.0.weight"]).max() > 0


def test_waveform_input_refused(pair):
    _, ours = pair
    with pytest.raises(InputError, match=r"^input_values: the speech_to_text encoder takes input_features"):
        ours(input_values=np.zeros((1, 1600), np.float32), decoder_input_ids=F.tokens(1, 3))


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory, batch):
    """(transformers model with loud cross-attention, ours from its checkpoint, an EOS some rows emit early)."""
    hf = F.amplify_cross_attention(F.speech_to_text_seq2seq("bart"))
    path = tmp_path_factory.mktemp("s2t-gen")
    hf.save_pretrained(path)
    free, _ = hf_generate(hf, *batch, max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START,
                          eos_token_id=F.VOCAB + 5)  # never emitted: greedy output without EOS
    return hf, SpeechSeq2Seq.from_pretrained(path), F.pick_eos(free)


def hf_generate(model, x, mask, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    with torch.no_grad():
        out = model.generate(input_features=torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    scores = getattr(out, "sequences_scores", None)
    return out.sequences.numpy(), None if scores is None else scores.numpy()


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate(gen_pair, batch, mode):
    hf, ours, eos = gen_pair
    kwargs = dict(max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START, eos_token_id=eos,
                  **(BEAM if mode == "beam" else {}))
    want, want_scores = hf_generate(hf, *batch, **kwargs)
    got = ours.generate(input_features=batch[0], attention_mask=batch[1], return_dict=True, **kwargs)
    np.testing.assert_array_equal(got["sequences"], want)
    assert len({tuple(row) for row in want.tolist()}) > 1  # the audio decides the tokens
    if mode == "beam":
        np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)


def test_roundtrip(tmp_path):
    """transformers -> speechseq -> transformers' files, through ``SpeechSeq2Seq`` and through ``convert`` then
    ``export``: every tensor bit for bit under its name, the same config (the sinusoidal table is a non-persistent
    buffer: in neither file), the feature extractor carried along. transformers' ``from_pretrained`` would
    build a whole ``Speech2TextModel`` for this encoder config, so the files are compared directly."""
    hf = F.speech_to_text_seq2seq("bert", tie=False)
    hf.save_pretrained(tmp_path / "hf")
    T.Speech2TextFeatureExtractor(normalize_vars=False).save_pretrained(tmp_path / "hf")
    SpeechSeq2Seq.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    convert(tmp_path / "hf", tmp_path / "converted", progress=False)
    export(tmp_path / "converted", tmp_path / "exported", progress=False)
    assert not any("embed_positions" in n for n in hf.state_dict())
    for out in ("ours", "exported"):
        F.assert_same_state_dict(load_file(tmp_path / out / "model.safetensors"), hf.state_dict())
        written, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in (out, "hf"))
        for key in ("encoder", "decoder", "decoder_start_token_id", "pad_token_id", "model_type"):
            assert written[key] == theirs[key], (out, key)
    fe = Processor.from_pretrained(tmp_path / "exported", require_tokenizer=False).feature_extractor
    assert isinstance(fe, Speech2TextFeatureExtractor) and not fe.normalize_vars


def test_config_writes_back():
    d = F.speech_to_text_config().to_dict()
    cfg = encoder_config_from_hf(d)
    assert cfg.to_dict() == d
    check_written(dataclasses.replace(cfg, hidden_size=24, num_layers=3, num_heads=4, intermediate_size=30,
                                      conv_kernel_sizes=(3, 3), conv_channels=8, max_source_positions=64,
                                      scale_embedding=False, hidden_dropout=0.2, layerdrop=0.1), "encoder")
    with pytest.raises(ConfigError, match=r"^encoder config: conv_kernel_sizes has 2 entries but num_conv_layers "
                                          r"is 3$"):
        encoder_config_from_hf(dict(d, num_conv_layers=3))


# standalone sources: where the encoder sits in the checkpoint, and the names warm start leaves (the text decoder)
SOURCES = {
    "Speech2TextForConditionalGeneration": (T.Speech2TextForConditionalGeneration, "model.encoder.",
                                            ("model.decoder.", "lm_head.")),
    "Speech2TextModel": (T.Speech2TextModel, "encoder.", ("decoder.",)),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_warm_start(tmp_path, batch, source):
    cls, base, ignored = SOURCES[source]
    encoder = F.perturb(cls(F.speech_to_text_config()), seed=1)
    encoder.save_pretrained(tmp_path / "enc")
    decoder = build_decoder("BertLMHeadModel", tmp_path / "dec")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec", pad_token_id=1)
    assert ours.config.encoder.model_type == "speech_to_text"
    state, info = ours.state_dict(), ours.loading_info
    filled = check_part(state, encoder, tmp_path / "enc", (cls, None, base, "", ignored), "encoder", info.unexpected)
    filled |= check_part(state, decoder, tmp_path / "dec", ("", "", "bert.", "bert.", ()), "decoder",
                         info.unexpected)
    fresh = set(state) - filled
    assert sorted(info.missing) == sorted(fresh)
    assert not any(n.startswith("encoder.") for n in fresh)  # the whole encoder came from the source
    # the joined model in transformers (built by hand: from_pretrained would build a Speech2TextModel), same numbers
    ours.save_pretrained(tmp_path / "joined")
    cfg = T.SpeechEncoderDecoderConfig.from_pretrained(tmp_path / "joined")
    hf = T.SpeechEncoderDecoderModel(encoder=Speech2TextEncoder(cfg.encoder),
                                     decoder=T.AutoModelForCausalLM.from_config(cfg.decoder))
    hf.config.decoder_start_token_id, hf.config.pad_token_id = cfg.decoder_start_token_id, cfg.pad_token_id
    load_state(hf, state)  # every name known to transformers, only tied aliases absent
    x, mask = batch
    labels = labels3()
    assert_parity(ours(input_features=x, attention_mask=mask, labels=labels),
                  F.hf_forward(hf, input_features=x, attention_mask=mask, labels=labels), with_loss=True)
