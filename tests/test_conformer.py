"""The Wav2Vec2-Conformer encoder (``encoders/wav2vec2_conformer.py``) against transformers 5.25 as a
``SpeechEncoderDecoderModel`` encoder, on tiny perturbed models (BatchNorm running statistics and counters perturbed
too), with rotary and relative positions: logits and loss on padded batches, gradients equal to ``loss.backward()``,
BatchNorm on batch statistics in training mode as torch's train mode, greedy and beam tokens, convert-then-export bit
for bit, warm start from standalone checkpoints (``Wav2Vec2ConformerModel``, ``Wav2Vec2ConformerForCTC``) and config
write-back. Helpers come from the other encoder tests (test_more_encoders and the files it draws on)."""

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
from speechseq import model as M
from speechseq.checkpoints import table
from speechseq.checkpoints.readers import open_checkpoint
from speechseq.config import encoder_config_from_hf
from speechseq.errors import ConfigError
from speechseq.training.step import loss_and_grad
from test_config_roundtrip import ENC_CHANGES, check_written
from test_more_encoders import BEAM, GEN_LENGTHS, NEW, PAD, START
from test_parity import check_labels_parity
from test_training_step import assert_grads_match_torch, EVAL_MODE, hf_named, padded_batch, torch_loss_and_grads
from test_warm_start import check_encoder_warm_start

# variants over hf_factory.ENC_BASE (depthwise kernel 5, no conv-module dropout), each paired with one decoder. The
# rotary one has layer norms in the feature encoder, a non-default base and layer_norm_eps (only the encoder's final
# norm takes it); the relative one a 20-wide adapter that meets the 20-wide BART without enc_to_dec_proj.
VARIANTS = {
    "rotary": dict(position_embeddings_type="rotary", rotary_embedding_base=500, feat_extract_norm="layer",
                   conv_bias=True, layer_norm_eps=1e-3),
    "relative": dict(position_embeddings_type="relative", feat_extract_norm="group", add_adapter=True,
                     output_hidden_size=20, num_adapter_layers=1),
    "none": dict(position_embeddings_type=None, hidden_act="relu"),
}
PAIRS = {"rotary": "bert", "relative": "bart", "none": "gpt2"}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "inv_freq")


def conformer_config(variant: str, **overrides) -> T.Wav2Vec2ConformerConfig:
    return T.Wav2Vec2ConformerConfig(**{**F.ENC_BASE, "conv_depthwise_kernel_size": 5, "conformer_conv_dropout": 0.0,
                                        **VARIANTS[variant], **overrides})


def perturb_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Running statistics away from their fresh 0 and 1 (``F.perturb`` moves parameters only) and a non-zero count,
    so that a mapping mistake shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.add_(torch.randn(module.running_mean.shape, generator=gen) * 0.3)
                module.running_var.mul_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.num_batches_tracked.fill_(1234)
    return model


def hf_model(variant: str, dec: str | None = None, tie: bool = True, seed: int = 0) -> torch.nn.Module:
    model = F.seq2seq_from_configs(conformer_config(variant), F.decoder_config(dec or PAIRS[variant], tie=tie), seed)
    return perturb_batch_norms(model, seed)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model from its checkpoint) per variant, with its PAIRS decoder."""
    return F.checkpoint_zoo(tmp_path_factory, hf_model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_loss(zoo, variant):
    """Padded audio (1600 and 1100 samples) and an all-ones mask; labels with -100 in one row."""
    hf, ours = zoo(variant)
    check_labels_parity(hf, ours)


def test_loss_and_grads_match_pytorch(zoo):
    """A padded batch through relative positions and the adapter: loss and every gradient equal ``loss.backward()``
    (judged as test_more_encoders judges them); the buffers in our params get no gradient."""
    hf, ours = zoo("relative")
    batch = padded_batch()
    loss, _, grads = jax.jit(lambda p, b: loss_and_grad(ours.config, EVAL_MODE, p, {}, b))(ours.params, batch)
    want_loss, want = torch_loss_and_grads(hf, batch)
    _, exact = torch_loss_and_grads(copy.deepcopy(hf).double(), batch)
    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
    got = hf_named(ours.config, grads)
    buffers = [n for n in got if n.endswith(BUFFERS)]
    assert len(buffers) == 3 * 2 and all(not np.any(got.pop(n)) for n in buffers)
    assert sorted(got) == sorted(want)  # every trainable tensor of transformers, no other
    assert_grads_match_torch(got, want, exact)
    new = [n for n in got if any(s in n for s in ("pos_bias", "linear_pos", "depthwise", "batch_norm.weight"))]
    assert len(new) == 5 * 2 and all(np.abs(got[n]).max() > 0 for n in new)


def _encoder_and_params(tmp_path, variant: str, **overrides):
    hf = perturb_batch_norms(F.perturb(T.Wav2Vec2ConformerModel(conformer_config(variant, **overrides))))
    hf.save_pretrained(tmp_path)
    cfg = encoder_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    fam = registry.family(cfg.model_type, "encoder")
    with open_checkpoint(tmp_path) as ckpt:
        flat, report = table.load(table.prefixed(fam.weight_rules(cfg), "", ""), ckpt)
    assert report.missing == [] and report.unexpected == []
    return hf, cfg, fam, table.unflatten(flat)


@pytest.mark.parametrize("variant", ["rotary"])
def test_training_mode_batch_norm(tmp_path, variant):
    """In training mode with nothing random left (dropout and LayerDrop rates 0, SpecAugment off) the BatchNorm
    normalises with the batch's statistics in transformers' train mode and in ours (given a key), which differs
    from the running statistics of eval mode."""
    hf, cfg, fam, params = _encoder_and_params(tmp_path, variant, apply_spec_augment=False)
    x, mask = F.audio_batch((1600, 1100))
    with torch.no_grad():
        want = hf.train()(input_values=torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).last_hidden_state
    got, _ = fam.apply(cfg, params, x, mask, rng=jax.random.key(0))
    assert F.max_abs_diff(got, want) <= 1e-4
    evaluated, _ = fam.apply(cfg, params, x, mask)
    assert F.max_abs_diff(evaluated, want) > 1e-2


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory):
    """(transformers model with loud cross-attention, ours from its checkpoint, an EOS some rows emit early)."""
    hf = F.amplify_cross_attention(hf_model("rotary", "bart"))
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    x, mask = F.audio_batch(GEN_LENGTHS)
    free, _ = F.hf_generate(hf, x, mask, max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START,
                            eos_token_id=F.VOCAB + 5)  # never emitted: greedy output without EOS
    return hf, SpeechSeq2Seq.from_pretrained(path), F.pick_eos(free)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate(gen_pair, mode):
    hf, ours, eos = gen_pair
    x, mask = F.audio_batch(GEN_LENGTHS)
    kwargs = dict(max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START, eos_token_id=eos,
                  **(BEAM if mode == "beam" else {}))
    want, want_scores = F.hf_generate(hf, x, mask, **kwargs)
    got = ours.generate(x, mask, return_dict=True, **kwargs)
    np.testing.assert_array_equal(got["sequences"], want)
    assert len({tuple(row) for row in want.tolist()}) > 1  # the audio decides the tokens
    if mode == "beam":
        np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["rotary", "relative"])
def test_roundtrip(tmp_path, variant):
    """transformers -> speechseq -> transformers: every tensor bit for bit under its name (the int64 BatchNorm
    counters and the rotary buffer included), the same config."""
    hf = hf_model(variant, "bert", tie=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = SpeechSeq2Seq.from_pretrained(tmp_path / "hf")
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    ours.save_pretrained(tmp_path / "ours")
    back, info = T.SpeechEncoderDecoderModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    F.assert_same_state_dict(back.state_dict(), hf.state_dict())
    assert any(n.endswith("num_batches_tracked") for n in hf.state_dict())
    written, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "hf"))
    for key in ("encoder", "decoder", "decoder_start_token_id", "pad_token_id", "model_type"):
        assert written[key] == theirs[key], key


# standalone sources as test_more_encoders.SOURCES: (class, variant, base in its checkpoint, base in the seq2seq
# encoder, names it ignores)
SOURCES = {
    "relative": (T.Wav2Vec2ConformerModel, "relative", "", "", ()),
    "rotary": (T.Wav2Vec2ConformerForCTC, "rotary", "wav2vec2_conformer.", "", ("lm_head.",)),
}


@pytest.mark.parametrize("variant", list(SOURCES))
def test_warm_start(tmp_path, variant):
    cls, name, *_ = SOURCES[variant]
    extra = dict(vocab_size=12) if cls is T.Wav2Vec2ConformerForCTC else {}
    encoder = perturb_batch_norms(F.perturb(cls(conformer_config(name, **extra)), seed=1), seed=1)
    check_encoder_warm_start(encoder, SOURCES[variant], tmp_path)


CHANGES = {
    "rotary": dict(ENC_CHANGES, rotary_embedding_base=123, conv_depthwise_kernel_size=7, conformer_conv_dropout=0.2),
    "relative": dict(ENC_CHANGES, position_embeddings_type="rotary"),
}


@pytest.mark.parametrize("variant", list(CHANGES))
def test_config_writes_back(variant):
    """An unchanged config writes back its dict; replaced fields reach the dict and transformers' class; a field the
    class fixes is refused when replaced; bad Conformer values are refused in one line naming the field."""
    d = conformer_config(variant).to_dict()
    cfg = encoder_config_from_hf(d)
    assert cfg.to_dict() == d
    check_written(dataclasses.replace(cfg, **CHANGES[variant]), "encoder")
    with pytest.raises(ConfigError, match=r"^wav2vec2-conformer: field stable_layer_norm="):
        dataclasses.replace(cfg, stable_layer_norm=False).to_dict()
    with pytest.raises(ConfigError, match=r"^encoder config: field 'position_embeddings_type' 'alibi' is not "):
        encoder_config_from_hf(dict(d, position_embeddings_type="alibi"))
    with pytest.raises(ConfigError, match=r"^encoder config: field 'conv_depthwise_kernel_size' should be odd, got 4$"):
        encoder_config_from_hf(dict(d, conv_depthwise_kernel_size=4))


def test_train_step_leaves_buffers_alone(zoo):
    """AdamW with weight decay on a rotary model: the running statistics, the batch counter and ``inv_freq`` come
    out of a step bit for bit (torch's optimizer never sees buffers), while the weights move."""
    from speechseq.training import OptimConfig, init_state, make_train_step
    from speechseq.training.optim import decay_mask

    _, ours = zoo("rotary")
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
    buffers = {path for r in M.weight_rules(ours.config) if r.buffer for path in r.paths}
    assert len(buffers) == 3 + 1
    mask = table.flatten(decay_mask(ours.config)(ours.params))
    assert not any(mask[p] for p in buffers)
    before = table.flatten(jax.tree.map(np.array, ours.params))
    state = init_state(ours.config, ours.params, optim, seed=0)
    state, _ = make_train_step(ours.config, optim, EVAL_MODE)(state, padded_batch())
    after = table.flatten(jax.tree.map(np.asarray, state.params))
    assert all(np.array_equal(after[p], before[p]) for p in buffers)
    assert not np.array_equal(after["decoder/embed/tokens"], before["decoder/embed/tokens"])

