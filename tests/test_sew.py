"""The SEW and SEW-D encoders (``encoders/sew.py``, ``sew_d.py``) against transformers 5.25 as a
``SpeechEncoderDecoderModel`` encoder, on tiny perturbed models: logits and loss on padded batches whose frame counts
are not multiples of the squeeze factor (with and without a sample mask), the frame mask the decoder's
cross-attention gets, gradients equal to ``loss.backward()``, greedy and beam tokens, convert-then-export bit for bit,
warm start from standalone ``SEWModel`` / ``SEWForCTC`` / ``SEWDModel`` checkpoints, config write-back, the one-line
errors, and SEW-D's relative position buckets against transformers' own function."""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers as T

import hf_factory as F
from speechseq import SpeechSeq2Seq, registry
from speechseq.config import encoder_config_from_hf
from speechseq.encoders import sew, sew_d
from speechseq.errors import ConfigError, InputError
from speechseq.training.step import loss_and_grad
from test_config_roundtrip import ENC_CHANGES, check_written
from test_more_encoders import BEAM, GEN_LENGTHS, NEW, PAD, START
from test_parity import assert_depends_on_audio, assert_parity
from test_training_step import assert_grads_match_torch, EVAL_MODE, hf_named, padded_batch, torch_loss_and_grads
from test_warm_start import check_encoder_warm_start

# Over the factory's tiny wav2vec2 base (conv features 12 wide, hidden 16). The feature encoder gives 79 frames for
# 1600 samples, 63 for 1290, 55 for 1120, 54 for 1100: partial squeeze windows at the end of the padded batch and of
# rows. name: (config class, fields over hf_factory.ENC_BASE)
VARIANTS = {
    # projected conv features (12 -> 16), an even positional kernel (its last frame dropped), mask embedding
    "sew": (T.SEWConfig, dict(squeeze_factor=2, feat_extract_norm="group", mask_time_prob=0.05)),
    # conv features as wide as the layers (no feature_projection), layer norms and bias in the convs, odd kernel
    "sew-layer": (T.SEWConfig, dict(squeeze_factor=3, feat_extract_norm="layer", conv_bias=True, conv_dim=(8, 12, 16),
                                    num_conv_pos_embeddings=7, mask_time_prob=0.0, hidden_act="gelu_new")),
    # 39 pooled frames over 8 buckets up to 20 apart: exact, log-spaced and clipped rows; shared projections,
    # LayerNorm'ed table
    "sew-d": (T.SEWDConfig, dict(squeeze_factor=2, position_buckets=8, max_position_embeddings=20,
                                 mask_time_prob=0.05)),
    # no buckets: raw distances clipped to 12; own pos_key_proj / pos_query_proj, no table norm, c2p and p2c
    "sew-d-own": (T.SEWDConfig, dict(squeeze_factor=3, position_buckets=-1, max_position_embeddings=12,
                                     share_att_key=False, norm_rel_ebd="none", conv_dim=(8, 12, 16),
                                     feat_extract_norm="layer", conv_bias=True, hidden_act="gelu_new",
                                     mask_time_prob=0.0)),
}
PAIRS = {"sew": "bert", "sew-layer": "bart", "sew-d": "bert", "sew-d-own": "bart"}
ODD_LENGTHS = (1600, 1290, 1120)  # 79, 63 and 55 frames


def sew_config(name: str, **overrides):
    """The tiny transformers ``SEWConfig`` / ``SEWDConfig`` of a VARIANTS entry, with optional field overrides."""
    cls, kw = VARIANTS[name]
    base = {k: v for k, v in F.ENC_BASE.items() if k != "layerdrop" or cls is T.SEWConfig}  # SEW-D has no LayerDrop
    return cls(**{**base, **kw, **overrides})


def hf_model(enc: str, dec: str, tie: bool = True) -> torch.nn.Module:
    return F.seq2seq_from_configs(sew_config(enc), F.decoder_config(dec, tie=tie))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model from its checkpoint) per variant, with its PAIRS decoder."""
    return F.checkpoint_zoo(tmp_path_factory, lambda enc: hf_model(enc, PAIRS[enc]))


# one variant per family also without a sample mask (another compile each)
@pytest.mark.parametrize("enc,unmasked", [("sew", True), ("sew-layer", False), ("sew-d", True), ("sew-d-own", False)])
def test_logits_and_loss(zoo, enc, unmasked):
    """Three rows of 79, 63 and 55 frames (partial squeeze windows), labels with -100 in one row: encoder states,
    logits and loss equal transformers', for two audio batches whose logits differ in every row."""
    hf, ours = zoo(enc)
    assert ours.config.encoder.squeeze_factor == VARIANTS[enc][1]["squeeze_factor"]
    labels = F.tokens(3, 6)
    labels[1, 4:] = -100
    logits = []
    for seed, masked in ((2, True), (3, True)) + (((2, False),) if unmasked else ()):
        x, mask = F.audio_batch(ODD_LENGTHS, seed=seed)
        mask = mask if masked else None
        got = ours(x, mask, labels=labels)
        assert_parity(got, F.hf_forward(hf, input_values=x, attention_mask=mask, labels=labels), with_loss=True)
        logits.append(np.asarray(got.logits))
    assert_depends_on_audio(logits[0], logits[1])


def test_frame_mask_is_transformers_cross_attention_mask():
    """The mask of the encoder's output frames is the one SpeechEncoderDecoderModel gives the cross-attention
    (``_get_feature_vector_attention_mask`` over the upsampled frames), for every length including 0."""
    hf = T.SEWModel(sew_config("sew"))
    cfg = encoder_config_from_hf(hf.config.to_dict())
    lengths = np.array([0, 1, 399, 400, 401, 1099, 1100, 1290, 1600])
    mask = (np.arange(1600)[None, :] < lengths[:, None]).astype(np.int32)
    want = hf._get_feature_vector_attention_mask(79, torch.from_numpy(mask)).numpy()
    got = registry.family("sew", "encoder").frame_mask(cfg, mask, 79)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert not want[0].any() and want[-1].all()


# the tensors SEW(-D) adds to wav2vec2's (name prefixes), by family: each must get a gradient
SEW_TENSORS = ("encoder.encoder.upsample.", "encoder.encoder.pos_conv_embed.", "encoder.feature_projection.",
               "encoder.layer_norm.")
NEW_TENSORS = {"sew": SEW_TENSORS,
               "sew-d": SEW_TENSORS + ("encoder.encoder.encoder.rel_embeddings.", "encoder.encoder.encoder.LayerNorm.")}


@pytest.mark.parametrize("enc,count", [("sew", 9), ("sew-d", 12)])
def test_loss_and_grads_match_pytorch(zoo, enc, count):
    """A padded batch: loss and every gradient equal ``loss.backward()``, judged as test_training_step judges them
    (1e-5 of the tensor's largest gradient, or a few times torch's own fp32 noise floor against float64)."""
    hf, ours = zoo(enc)  # eval mode: no SpecAugment; dropout and LayerDrop rates are 0
    batch = padded_batch(lengths=(1600, 1290))
    loss, _, grads = jax.jit(lambda p, b: loss_and_grad(ours.config, EVAL_MODE, p, {}, b))(ours.params, batch)
    want_loss, want = torch_loss_and_grads(hf, batch)
    _, exact = torch_loss_and_grads(copy.deepcopy(hf).double(), batch)
    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
    got = hf_named(ours.config, grads)
    assert sorted(got) == sorted(want)  # every trainable tensor of transformers, no other
    assert_grads_match_torch(got, want, exact)
    new = [n for n in got if n.startswith(NEW_TENSORS[enc])]
    assert len(new) == count and all(np.abs(got[n]).max() > 0 for n in new), new


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory):
    """(transformers model with loud cross-attention, ours from its checkpoint, an EOS some rows emit early). With
    BERT: with BART these tiny models emit the same tokens whatever the audio."""
    cache = {}

    def get(enc: str):
        if enc not in cache:
            hf = F.amplify_cross_attention(hf_model(enc, "bert"))
            path = tmp_path_factory.mktemp(f"gen-{enc}")
            hf.save_pretrained(path)
            x, mask = F.audio_batch(GEN_LENGTHS)
            free, _ = F.hf_generate(hf, x, mask, max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START,
                                    eos_token_id=F.VOCAB + 5)  # never emitted: greedy output without EOS
            cache[enc] = hf, SpeechSeq2Seq.from_pretrained(path), F.pick_eos(free)
        return cache[enc]

    return get


# SEW-D: beam only (its decoding is SEW's over other frames; each case compiles a search)
@pytest.mark.parametrize("enc,mode", [("sew", "greedy"), ("sew", "beam"), ("sew-d", "beam")])
def test_generate(gen_pair, enc, mode):
    hf, ours, eos = gen_pair(enc)
    x, mask = F.audio_batch(GEN_LENGTHS)
    kwargs = dict(max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START, eos_token_id=eos,
                  **(BEAM if mode == "beam" else {}))
    want, want_scores = F.hf_generate(hf, x, mask, **kwargs)
    got = ours.generate(x, mask, return_dict=True, **kwargs)
    np.testing.assert_array_equal(got["sequences"], want)
    assert len({tuple(row) for row in want.tolist()}) > 1  # the audio decides the tokens
    if mode == "beam":
        np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("enc", list(VARIANTS))
def test_roundtrip(tmp_path, enc):
    """transformers -> speechseq -> transformers: every tensor bit for bit under its name, the same config."""
    hf = hf_model(enc, "bert", tie=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = SpeechSeq2Seq.from_pretrained(tmp_path / "hf")
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    ours.save_pretrained(tmp_path / "ours")
    back, info = T.SpeechEncoderDecoderModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    F.assert_same_state_dict(back.state_dict(), hf.state_dict())
    assert any("encoder.feature_projection" in n for n in hf.state_dict()) == (enc in ("sew", "sew-d"))
    written, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "hf"))
    for key in ("encoder", "decoder", "decoder_start_token_id", "pad_token_id", "model_type"):
        assert written[key] == theirs[key], key


# (class, variant, where the base model sits in its checkpoint, where it sits in SpeechEncoderDecoderModel's encoder,
# the checkpoint names it ignores: the CTC head)
SOURCES = {"SEWModel": (T.SEWModel, "sew", "", "", ()), "SEWForCTC": (T.SEWForCTC, "sew", "sew.", "", ("lm_head.",)),
           "SEWDModel": (T.SEWDModel, "sew-d", "", "", ())}


@pytest.mark.parametrize("source", list(SOURCES))
def test_warm_start(tmp_path, source):
    cls, variant, *spec = SOURCES[source]
    encoder = F.perturb(cls(sew_config(variant, vocab_size=12)), seed=1)
    unexpected = check_encoder_warm_start(encoder, SOURCES[source], tmp_path)
    if spec[2]:  # the head was in the file and is reported
        assert any(n.startswith("encoder.lm_head.") for n in unexpected)


NO_ADAPTER = {k: v for k, v in ENC_CHANGES.items() if "adapter" not in k and k != "output_hidden_size"}


def test_config_writes_back():
    """An unchanged config writes back its dict; replaced fields reach the dict and transformers' class; the fields
    SEWConfig lacks are refused when replaced; a bad squeeze_factor is a one-line error naming it."""
    d = sew_config("sew").to_dict()
    cfg = encoder_config_from_hf(d)
    assert cfg.to_dict() == d
    assert cfg.project_features and not encoder_config_from_hf(sew_config("sew-layer").to_dict()).project_features
    check_written(dataclasses.replace(cfg, squeeze_factor=3, **NO_ADAPTER), "encoder")
    for fixed in (dict(stable_layer_norm=True), dict(add_adapter=True), dict(feat_proj_layer_norm=False),
                  dict(spec_augment_lengths=True)):
        with pytest.raises(ConfigError, match=f"^sew: field {next(iter(fixed))}="):
            dataclasses.replace(cfg, **fixed).to_dict()
    with pytest.raises(ConfigError, match=r"^encoder config: field 'squeeze_factor' should be an integer >= 1, got 0$"):
        encoder_config_from_hf(dict(d, squeeze_factor=0))


def test_sew_d_config_writes_back():
    """SEW-D's own fields reach the dict and transformers' class (``norm_rel_ebd`` as its string, the dropout after
    attention and feed-forward as ``activation_dropout``); what SEWDConfig lacks is refused; bad values are one-line
    errors naming the field."""
    d = sew_config("sew-d").to_dict()
    cfg = encoder_config_from_hf(d)
    assert cfg.to_dict() == d
    assert cfg.hf["hidden_act"] == "gelu_python" and cfg.layer_norm_eps == 1e-7 and cfg.att_span == 8
    changes = dict(NO_ADAPTER, squeeze_factor=3, feature_layer_norm_eps=1e-6, position_buckets=16,
                   max_relative_positions=30, share_att_key=False, pos_att_type=("c2p",), norm_rel_ebd=False,
                   hidden_dropout=0.2, relative_attention=False)
    written = check_written(dataclasses.replace(cfg, **changes), "encoder")
    assert written["norm_rel_ebd"] == "none" and written["activation_dropout"] == 0.2
    assert encoder_config_from_hf(dict(d, pos_att_type="p2c|c2p")) == cfg  # DeBERTa's string form
    for fixed in (dict(activation_dropout=0.1), dict(layerdrop=0.1), dict(stable_layer_norm=True)):
        with pytest.raises(ConfigError, match=f"^sew-d: field {next(iter(fixed))}="):
            dataclasses.replace(cfg, **fixed).to_dict()
    for key, value, message in (
            ("pos_att_type", ["p2p"], r"field 'pos_att_type' should be a list of \['c2p', 'p2c'\], got \['p2p'\]$"),
            ("norm_rel_ebd", "batch_norm", r"field 'norm_rel_ebd' should be 'layer_norm' or 'none', got 'batch_norm'$"),
            ("conv_kernel_size", 3, r"option conv_kernel_size=3 is not supported for sew-d \(supported: 0\)$"),
            ("position_buckets", 1, r"position_buckets 1 with max_relative_positions 20 leave the log-spaced "
                                    r"buckets undefined \(a division by zero\)$"),
            ("max_position_embeddings", 5, r"position_buckets 8 with max_relative_positions 5 leave")):
        with pytest.raises(ConfigError, match="^encoder config: " + message):
            encoder_config_from_hf(dict(d, **{key: value}))


@pytest.mark.parametrize("buckets,max_position", [(256, 512), (8, 20), (6, 15), (-1, 30)])
def test_sew_d_relative_positions(buckets, max_position):
    """Every (query, key) pair of 1200 pooled frames (48 s at squeeze 2) gets transformers' relative position."""
    from transformers.models.sew_d.modeling_sew_d import build_relative_position

    cfg = encoder_config_from_hf(sew_config("sew-d", position_buckets=buckets, max_position_embeddings=max_position)
                                 .to_dict())
    want = build_relative_position(1200, 1200, bucket_size=buckets, max_position=max_position)[0].numpy()
    np.testing.assert_array_equal(sew_d.relative_positions(cfg, 1200), want)
    if buckets > 0:
        assert len(np.unique(want)) > buckets  # log-spaced beyond the exact ones (and past the table, clipped later)


def test_too_short_for_the_squeeze(zoo):
    """Audio with fewer frames than squeeze_factor is refused in one line (59 samples give 1 frame, 60 give 2)."""
    _, ours = zoo("sew")
    with pytest.raises(InputError) as e:
        ours(np.zeros((1, 59), np.float32), decoder_input_ids=np.zeros((1, 1), np.int64))
    assert str(e.value) == ("input_values: audio of 59 samples gives 1 frame(s), fewer than squeeze_factor 2; the "
                            "encoder needs at least 60 samples")
    sew.check_squeeze(ours.config.encoder, 60)  # the first length that gives 2 frames passes
