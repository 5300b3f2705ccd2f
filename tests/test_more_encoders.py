"""The encoder families of issue 30 (``hf_factory.MORE_ENCODERS``: UniSpeech, UniSpeech-SAT, Data2VecAudio, WavLM)
against transformers 5.25 as a ``SpeechEncoderDecoderModel`` encoder, on tiny perturbed models: logits and loss on
padded batches, gradients equal to ``loss.backward()``, greedy and beam tokens, convert-then-export bit for bit,
warm start from a standalone checkpoint of the family (pre-training heads ignored), config write-back, and WavLM's
relative position buckets against transformers' own function."""

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
from speechseq.checkpoints import table
from speechseq.checkpoints.readers import open_checkpoint
from speechseq.config import encoder_config_from_hf
from speechseq.errors import ConfigError
from speechseq.training.step import loss_and_grad
from test_config_roundtrip import ENC_CHANGES, check_written
from test_parity import assert_parity, check_labels_parity, labels_with_ignored
from test_training_step import assert_grads_match_torch, EVAL_MODE, hf_named, padded_batch, torch_loss_and_grads
from test_warm_start import check_encoder_warm_start

# each variant with one decoder family (the decoders are the same code whatever the encoder); the 20-wide
# Data2VecAudio adapter meets the 20-wide mBART without enc_to_dec_proj, the others need it (16 -> 20)
PAIRS = {"unispeech": "bert", "unispeech-sat": "gpt2", "data2vec-audio": "bart", "data2vec-audio-adapter": "mbart",
         "wavlm": "roberta", "wavlm-stable": "bart"}
ENCODERS = list(PAIRS)
# one variant per family for the costlier checks (generate, gradients)
PER_FAMILY = ["unispeech", "unispeech-sat", "data2vec-audio", "wavlm-stable"]
GEN_LENGTHS = (1600, 1100, 1400)
START, PAD, NEW = 0, 1, 8
BEAM = dict(num_beams=3, num_return_sequences=2, early_stopping=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_model(enc: str, dec: str, tie: bool = True, seed: int = 0) -> torch.nn.Module:
    return F.seq2seq_from_configs(F.more_encoder_config(enc), F.decoder_config(dec, tie=tie), seed)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model from its checkpoint) per encoder variant, with its PAIRS decoder."""
    return F.checkpoint_zoo(tmp_path_factory, lambda enc: hf_model(enc, PAIRS[enc]))


@pytest.mark.parametrize("enc", ENCODERS)
def test_logits_and_loss(zoo, enc):
    """Padded audio (1600 and 1100 samples) and an all-ones mask; labels with -100 in one row."""
    hf, ours = zoo(enc)
    check_labels_parity(hf, ours)


@pytest.mark.parametrize("enc", ["wavlm"])  # (UniSpeech's unmasked attention is wav2vec2's, test_parity)
def test_no_attention_mask(zoo, enc):
    """Group-norm checkpoints are fed without a sample mask: no key mask in the (gated) attention."""
    hf, ours = zoo(enc)
    labels = labels_with_ignored()
    x, _ = F.audio_batch((1600, 1100))
    assert_parity(ours(x, labels=labels), F.hf_forward(hf, input_values=x, labels=labels), with_loss=True)


def test_bfloat16_close_to_float32(zoo):
    """bfloat16 compute through WavLM's gated bias stays close to float32."""
    _, ours = zoo("wavlm-stable")
    labels = labels_with_ignored()
    x, mask = F.audio_batch((1600, 1100))
    full, low = ours(x, mask, labels=labels), ours.astype("bfloat16")(x, mask, labels=labels)
    assert 0 < F.max_abs_diff(low.logits, full.logits) < 0.15
    assert abs(float(low.loss) - float(full.loss)) < 0.05


# the families with compute of their own (UniSpeech's program is wav2vec2's, which test_training_step covers)
@pytest.mark.parametrize("enc", ["data2vec-audio", "wavlm-stable"])
def test_loss_and_grads_match_pytorch(zoo, enc):
    """A padded batch: loss and every gradient equal ``loss.backward()``, judged as test_training_step judges them
    (1e-5 of the tensor's largest gradient, or a few times torch's own fp32 noise floor against float64)."""
    hf, ours = zoo(enc)  # eval mode: no SpecAugment; dropout and LayerDrop rates are 0
    batch = padded_batch()
    loss, _, grads = jax.jit(lambda p, b: loss_and_grad(ours.config, EVAL_MODE, p, {}, b))(ours.params, batch)
    want_loss, want = torch_loss_and_grads(hf, batch)
    _, exact = torch_loss_and_grads(copy.deepcopy(hf).double(), batch)
    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
    got = hf_named(ours.config, grads)
    assert sorted(got) == sorted(want)  # every trainable tensor of transformers, no other
    assert_grads_match_torch(got, want, exact)
    new = [n for n in got if "pos_conv" in n or "gru_rel_pos" in n or "rel_attn" in n]
    assert new and all(np.abs(got[n]).max() > 0 for n in new if "weight" in n or "const" in n)


def test_wavlm_layerdrop_keeps_the_first_layer(tmp_path):
    """LayerDrop 1 in training mode (nothing else random: dropout rates 0, SpecAugment off) is deterministic in
    transformers too: WavLM still runs its first layer, which makes the position bias (the wav2vec2 family's
    default, skipping every layer, gives other states)."""
    hf = T.WavLMModel(F.more_encoder_config("wavlm-stable", layerdrop=1.0, apply_spec_augment=False))
    F.perturb(hf).train()
    hf.save_pretrained(tmp_path)
    x, mask = F.audio_batch((1600, 1100))
    with torch.no_grad():
        want = hf(input_values=torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).last_hidden_state
    cfg = encoder_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    fam = registry.family(cfg.model_type, "encoder")
    with open_checkpoint(tmp_path) as ckpt:
        flat, _ = table.load(table.prefixed(fam.weight_rules(cfg), "", ""), ckpt)
    got, _ = fam.apply(cfg, table.unflatten(flat), x, mask, rng=jax.random.key(0))
    assert F.max_abs_diff(got, want) <= 1e-4
    skipped_all, _ = fam.apply(dataclasses.replace(cfg, layerdrop_first_layer=True), table.unflatten(flat), x, mask,
                               rng=jax.random.key(0))
    assert F.max_abs_diff(skipped_all, want) > 1e-3


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory):
    """(transformers model with loud cross-attention, ours from its checkpoint, an EOS some rows emit early)."""
    cache = {}

    def get(enc: str):
        if enc not in cache:
            hf = F.amplify_cross_attention(hf_model(enc, "bart"))
            path = tmp_path_factory.mktemp(f"gen-{enc}")
            hf.save_pretrained(path)
            x, mask = F.audio_batch(GEN_LENGTHS)
            free, _ = F.hf_generate(hf, x, mask, max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START,
                                    eos_token_id=F.VOCAB + 5)  # never emitted: greedy output without EOS
            cache[enc] = hf, SpeechSeq2Seq.from_pretrained(path), F.pick_eos(free)
        return cache[enc]

    return get


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("enc", PER_FAMILY)
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


@pytest.mark.parametrize("enc", ENCODERS)
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
    written, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "hf"))
    for key in ("encoder", "decoder", "decoder_start_token_id", "pad_token_id", "model_type"):
        assert written[key] == theirs[key], key


# standalone sources: (class, factory variant, where the base model sits in its checkpoint, where it sits in
# SpeechEncoderDecoderModel's encoder, checkpoint names it ignores: the pre-training and CTC heads)
TINY_HEADS = dict(codevector_dim=8, proj_codevector_dim=8, num_codevectors_per_group=4, vocab_size=12)
SOURCES = {
    "unispeech": (T.UniSpeechForPreTraining, "unispeech", "unispeech.", "",
                  ("quantizer.", "project_q.", "project_hid.", "ctc_proj.")),
    "unispeech-sat": (T.UniSpeechSatForPreTraining, "unispeech-sat", "unispeech_sat.", "",
                      ("quantizer.", "project_q.", "project_hid.", "speaker_proj.", "label_embeddings_concat",
                       "layer_norm_for_extract.")),
    "data2vec-audio": (T.Data2VecAudioForCTC, "data2vec-audio", "data2vec_audio.", "", ("lm_head.",)),
    "wavlm-stable": (T.WavLMModel, "wavlm-stable", "", "", ()),
}


@pytest.mark.parametrize("enc", list(SOURCES))
def test_warm_start(tmp_path, enc):
    cls, variant, *_ = SOURCES[enc]
    overrides = {k: v for k, v in TINY_HEADS.items() if k in cls.config_class().to_dict()}
    encoder = F.perturb(cls(F.more_encoder_config(variant, **overrides)), seed=1)
    unexpected = check_encoder_warm_start(encoder, SOURCES[enc], tmp_path)
    if SOURCES[enc][4]:  # the heads were in the file and are reported
        assert any(n.startswith("encoder.") for n in unexpected)


# fields each family's transformers config class lacks (UniSpeech: no adapter)
NO_ADAPTER = {k: v for k, v in ENC_CHANGES.items() if "adapter" not in k and k != "output_hidden_size"}
CHANGES = {"unispeech": NO_ADAPTER, "unispeech-sat": NO_ADAPTER,
           "data2vec-audio": dict(ENC_CHANGES, conv_pos_kernel_size=6),
           "wavlm": dict(ENC_CHANGES, num_buckets=32, max_bucket_distance=64)}


@pytest.mark.parametrize("enc", list(CHANGES))
def test_config_writes_back(enc):
    """An unchanged config writes back its dict; replaced fields reach the dict and transformers' class; a field
    the class fixes (UniSpeech's adapter, Data2VecAudio's norms) is refused when replaced."""
    d = F.more_encoder_config(enc).to_dict()
    cfg = encoder_config_from_hf(d)
    assert cfg.to_dict() == d
    check_written(dataclasses.replace(cfg, **CHANGES[enc]), "encoder")
    fixed = {"unispeech": dict(add_adapter=True), "unispeech-sat": dict(feat_proj_layer_norm=False),
             "data2vec-audio": dict(stable_layer_norm=True), "wavlm": dict(layerdrop_first_layer=True)}[enc]
    with pytest.raises(ConfigError, match=f"^{cfg.model_type}: field {next(iter(fixed))}="):
        dataclasses.replace(cfg, **fixed).to_dict()
    if enc == "unispeech-sat":  # the mask embedding whatever the masking rates
        assert cfg.masked_spec_embed and cfg.hf["mask_time_prob"] == 0
    if enc == "wavlm":  # too few buckets to have an exact one: refused in one line, naming the field
        with pytest.raises(ConfigError, match=r"^encoder config: field 'num_buckets' should be an integer >= 4, "
                                              r"got 3$"):
            encoder_config_from_hf(dict(d, num_buckets=3))


@pytest.mark.parametrize("num_buckets,max_distance", [(320, 800), (16, 40)])
def test_wavlm_position_buckets(num_buckets, max_distance):
    """Every (query, key) pair of a 1200-frame clip (24 s) falls in transformers' bucket."""
    from speechseq.encoders import wavlm

    cfg = encoder_config_from_hf(F.more_encoder_config("wavlm", num_buckets=num_buckets,
                                                       max_bucket_distance=max_distance).to_dict())
    attn = T.models.wavlm.modeling_wavlm.WavLMAttention(16, 2, num_buckets=num_buckets, max_distance=max_distance)
    S = 1200
    rel = torch.arange(S)[None, :] - torch.arange(S)[:, None]
    want = attn._relative_positions_bucket(rel).numpy()
    got = wavlm.position_buckets(cfg, S)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) == num_buckets - 1  # every bucket but "+0" (a key after the query is never 0 away)
