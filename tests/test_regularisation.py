"""Randomness and regularisation: ``rng=None`` is transformers' eval mode (test_parity checks the numbers), a key turns
on dropout and LayerDrop (same key, same result), the rates are measured where they apply, the typed dropout fields
survive ``save_pretrained`` into transformers' config, and the loss as a sum and a count adds up across batches."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.config import config_from_dict
from speechseq.decoders import transformer
from speechseq.errors import ConfigError
from speechseq.layers.core import dropout, layer_drop
from speechseq.model import cross_entropy, cross_entropy_sum, forward_jit
from speechseq.registry import family
from test_warm_start import build_decoder, build_encoder

# (encoder variant, decoder family): every decoder family's sites and both wav2vec2 layer orders
CASES = [("w2v-group", "bart"), ("w2v-layer-stable", "gpt2"), ("hubert", "bert")]


def sigma(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def config_dict(enc: str, dec: str, rate: float = 0.0, layerdrop: float = 0.0, dec_hidden: int = 20, **dec_kw) -> dict:
    """A speech-encoder-decoder config dict of the factory's tiny models with every dropout rate of the encoder and
    the decoder (under each family's HF names) set to ``rate``, LayerDrop to ``layerdrop``, SpecAugment off."""
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        F.any_encoder_config(enc), F.decoder_config(dec, dec_hidden)).to_dict()
    cfg.update(decoder_start_token_id=0, pad_token_id=1)
    for part in ("encoder", "decoder"):
        for f in family(cfg[part]["model_type"], part).fields:
            if "drop" in f.attr:
                cfg[part][f.key] = layerdrop if f.attr == "layerdrop" else rate
    cfg["encoder"]["apply_spec_augment"] = False  # dropout and LayerDrop only: SpecAugment in test_spec_augment
    cfg["decoder"].update(dec_kw)
    return cfg


def run(model: SpeechSeq2Seq, rng=None):
    x, mask = F.audio_batch()
    return forward_jit(model.config, model.params, x, mask, labels=F.tokens(2, 7), rng=rng)


# ---------------------------------------------------------------------------------------------------- the helpers


def test_dropout_helper_rate_and_scale():
    x = jnp.full((400, 500), 2.0, jnp.float32)
    assert dropout(x, 0.3, None) is x and dropout(x, 0.0, jax.random.key(0)) is x
    y = np.asarray(jax.jit(dropout, static_argnums=1)(x, 0.3, jax.random.key(0)))
    dropped = np.mean(y == 0)
    assert abs(dropped - 0.3) < 5 * sigma(0.3, y.size), dropped
    np.testing.assert_allclose(y[y != 0], 2.0 / 0.7, rtol=1e-6)  # inverted dropout: survivors scaled by 1 / (1 - p)
    assert abs(y.mean() - 2.0) < 0.02  # the expectation is kept
    assert dropout(x.astype(jnp.bfloat16), 0.3, jax.random.key(0)).dtype == jnp.bfloat16
    assert not np.asarray(dropout(x, 1.0, jax.random.key(0))).any()


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_draws_are_independent_and_any_shape(rate):
    """16 bits an element, two elements a 32-bit word: each element is dropped at the rate, and neighbours (the two
    halves of one word) and the last element of an odd count too."""
    x = jnp.ones((3, 333, 201), jnp.float32)  # an odd number of elements
    y = np.asarray(dropout(x, rate, jax.random.key(3))).reshape(-1)
    assert y.shape == (x.size,)
    dropped = y == 0
    assert abs(dropped.mean() - rate) < 5 * sigma(rate, y.size), dropped.mean()
    pairs = dropped[:-1:2] & dropped[1::2]  # both halves of a word
    assert abs(pairs.mean() - rate ** 2) < 5 * sigma(rate ** 2, pairs.size), pairs.mean()
    assert not np.array_equal(dropped, np.asarray(dropout(x, rate, jax.random.key(4))).reshape(-1) == 0)


def test_layer_drop_skips_at_the_rate():
    keys = jax.random.split(jax.random.key(1), 20000)
    ran = jax.jit(jax.vmap(lambda k: layer_drop(lambda h: h + 1.0, jnp.zeros(()), 0.3, k)))(keys)
    skipped = float(np.mean(np.asarray(ran) == 0))
    assert abs(skipped - 0.3) < 5 * sigma(0.3, keys.shape[0]), skipped
    assert layer_drop(lambda h: h + 1.0, jnp.zeros(()), 0.3, None) == 1.0


# ---------------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("enc,dec", CASES)
def test_key_turns_on_dropout_deterministically(enc, dec):
    model = SpeechSeq2Seq.from_config(config_dict(enc, dec, rate=0.1, layerdrop=0.1))
    eval_out = run(model)
    a, b, c = (run(model, jax.random.key(k)) for k in (0, 0, 1))
    for name in ("logits", "encoder_last_hidden_state"):
        assert not np.allclose(getattr(a, name), getattr(eval_out, name), atol=1e-3), name
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)  # same key, same masks
        assert not np.allclose(getattr(a, name), getattr(c, name), atol=1e-3), name
    if (enc, dec) != CASES[0]:
        return
    # the object's call takes the key too, and forward an old-style uint32 key
    np.testing.assert_array_equal(model(*F.audio_batch(), labels=F.tokens(2, 7), rng=jax.random.key(0)).logits,
                                  a.logits)
    assert np.isfinite(float(run(model, jax.random.PRNGKey(0)).loss))


@pytest.mark.parametrize("enc,dec", CASES)
def test_zero_rates_with_a_key_are_eval_mode(enc, dec):
    model = SpeechSeq2Seq.from_config(config_dict(enc, dec))
    eval_out, keyed = run(model), run(model, jax.random.key(0))
    np.testing.assert_array_equal(keyed.logits, eval_out.logits)
    np.testing.assert_array_equal(keyed.loss, eval_out.loss)


def test_gradients_with_dropout_are_finite_and_keyed():
    model = SpeechSeq2Seq.from_config(config_dict("w2v-group", "bart", rate=0.1, layerdrop=0.1))
    x, mask = F.audio_batch()
    labels = F.tokens(2, 7)

    @jax.jit
    def grad(params, key):
        return jax.grad(lambda p: forward_jit(model.config, p, x, mask, labels=labels, rng=key).loss)(params)

    g0, g0_again, g1 = grad(model.params, jax.random.key(0)), grad(model.params, jax.random.key(0)), \
        grad(model.params, jax.random.key(1))
    leaves = jax.tree.leaves(g0)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(g0_again)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(g1)))


def test_embedding_dropout_rate_at_its_site():
    """GPT-2 with only ``embd_pdrop`` = 0.3: the decoder's embeddings lose 30% of their values, the rest scaled."""
    cfg = config_from_dict(config_dict("w2v-group", "gpt2", dec_hidden=64, embd_pdrop=0.3))
    dec = cfg.decoder
    assert (dec.embed_dropout, dec.hidden_dropout, dec.attention_dropout) == (0.3, 0.0, 0.0)
    params = SpeechSeq2Seq.from_config(cfg).params["decoder"]["embed"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, F.VOCAB, (16, 40)))
    pos = transformer.positions(dec, ids)
    embed = jax.jit(transformer.embed, static_argnums=(0, 4))
    full, kept = np.asarray(embed(dec, params, ids, pos, jnp.float32)), \
        np.asarray(embed(dec, params, ids, pos, jnp.float32, jax.random.key(0)))
    dropped = np.mean(kept == 0)
    assert abs(dropped - 0.3) < 5 * sigma(0.3, kept.size), dropped
    np.testing.assert_allclose(kept[kept != 0], full[kept != 0] / 0.7, rtol=1e-5)


def test_layerdrop_one_skips_every_layer():
    """wav2vec2 ``layerdrop`` and BART ``decoder_layerdrop`` at 1: with a key no layer runs, so the layers' weights
    do not matter; without one they do."""
    model = SpeechSeq2Seq.from_config(config_dict("w2v-group", "bart", layerdrop=1.0))
    doubled = {**model.params,
               "encoder": {**model.params["encoder"], "layers": jax.tree.map(lambda a: 2 * a,
                                                                             model.params["encoder"]["layers"])},
               "decoder": {**model.params["decoder"], "layers": jax.tree.map(lambda a: 2 * a,
                                                                             model.params["decoder"]["layers"])}}
    other = SpeechSeq2Seq(model.config, doubled)
    key = jax.random.key(0)
    np.testing.assert_array_equal(run(model, key).logits, run(other, key).logits)
    assert not np.allclose(run(model).logits, run(other).logits, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- configs


# the decoder's hidden dropout under each family's transformers name
HIDDEN_NAME = {"bert": "hidden_dropout_prob", "gpt2": "resid_pdrop", "bart": "dropout"}


@pytest.mark.parametrize("dec", list(HIDDEN_NAME))
def test_replaced_rates_survive_save_pretrained(tmp_path, dec):
    model = SpeechSeq2Seq.from_config(config_dict("w2v-group", dec))
    cfg = model.config
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, hidden_dropout=0.2, layerdrop=0.05),
                              decoder=dataclasses.replace(cfg.decoder, hidden_dropout=0.2, attention_dropout=0.15))
    SpeechSeq2Seq(cfg, model.params).save_pretrained(tmp_path)
    back = SpeechSeq2Seq.from_pretrained(tmp_path).config
    assert (back.encoder.hidden_dropout, back.encoder.layerdrop) == (0.2, 0.05)
    assert (back.decoder.hidden_dropout, back.decoder.attention_dropout) == (0.2, 0.15)
    assert back == cfg
    theirs = T.SpeechEncoderDecoderModel.from_pretrained(tmp_path).config
    assert (theirs.encoder.hidden_dropout, theirs.encoder.layerdrop) == (0.2, 0.05)
    assert getattr(theirs.decoder, HIDDEN_NAME[dec]) == 0.2
    written = json.loads((tmp_path / "config.json").read_text())["decoder"]
    original = json.loads(json.dumps(model.config.decoder.to_dict()))  # as JSON has it (id2label keys are strings)
    changed = {k for k in set(written) | set(original) if written.get(k) != original.get(k)}
    assert changed == {HIDDEN_NAME[dec], {"bert": "attention_probs_dropout_prob", "gpt2": "attn_pdrop",
                                          "bart": "attention_dropout"}[dec]}


def test_unchanged_config_writes_back_its_dict():
    cfg = config_dict("hubert", "gpt2", rate=0.1)
    parsed = config_from_dict(cfg)
    assert parsed.encoder.to_dict() == cfg["encoder"] and parsed.decoder.to_dict() == cfg["decoder"]


def test_rate_without_a_hf_name_is_refused():
    cfg = config_from_dict(config_dict("w2v-group", "bert"))
    bad = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, layerdrop=0.1))
    with pytest.raises(ConfigError, match=r"^bert: field layerdrop=0.1 has no Hugging Face config key"):
        bad.to_dict()


@pytest.mark.parametrize("part,key", [("encoder", "hidden_dropout"), ("encoder", "mask_time_length"),
                                      ("decoder", "attn_pdrop")])
def test_bad_rates_name_the_field(part, key):
    cfg = config_dict("w2v-group", "gpt2")
    cfg[part][key] = 1.5
    with pytest.raises(ConfigError, match=f"field '{key}' should be"):
        config_from_dict(cfg)


def test_warm_start_keywords_land_in_the_typed_config(tmp_path):
    build_encoder("Wav2Vec2Model", tmp_path / "enc")
    for name in ("BartForCausalLM", "GPT2LMHeadModel", "BertLMHeadModel"):
        build_decoder(name, tmp_path / name)
    enc = tmp_path / "enc"
    bart = SpeechSeq2Seq.from_encoder_decoder_pretrained(enc, tmp_path / "BartForCausalLM", decoder_dropout=0.1,
                                                         encoder_layerdrop=0.3, encoder_mask_time_prob=0.2)
    assert bart.config.decoder.hidden_dropout == 0.1
    assert (bart.config.encoder.layerdrop, bart.config.encoder.mask_time_prob) == (0.3, 0.2)
    bert = SpeechSeq2Seq.from_encoder_decoder_pretrained(enc, tmp_path / "BertLMHeadModel",
                                                         decoder_hidden_dropout_prob=0.1)
    assert bert.config.decoder.hidden_dropout == 0.1
    # the typed (family-neutral) names reach the family's HF name
    gpt2 = SpeechSeq2Seq.from_encoder_decoder_pretrained(enc, tmp_path / "GPT2LMHeadModel",
                                                         decoder_hidden_dropout=0.15, decoder_embed_dropout=0.05)
    assert (gpt2.config.decoder.hidden_dropout, gpt2.config.decoder.embed_dropout) == (0.15, 0.05)
    assert gpt2.config.to_dict()["decoder"]["resid_pdrop"] == 0.15
    assert "hidden_dropout" not in gpt2.config.decoder.hf


# ---------------------------------------------------------------------------------------------------- loss


def test_loss_sum_and_count_combine_like_one_batch():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 6, F.VOCAB)), jnp.float32)
    labels = rng.integers(0, F.VOCAB, (4, 6))
    labels[0, 2:] = -100  # halves with different numbers of tokens: the mean of means would be wrong
    labels[3, 1:] = -100
    labels = jnp.asarray(labels)
    total, count = cross_entropy_sum(logits, labels)
    assert int(count) == int(np.sum(np.asarray(labels) != -100)) and count.dtype == jnp.int32
    np.testing.assert_allclose(total / count, cross_entropy(logits, labels), rtol=1e-6)
    (s1, c1), (s2, c2) = cross_entropy_sum(logits[:2], labels[:2]), cross_entropy_sum(logits[2:], labels[2:])
    np.testing.assert_allclose((s1 + s2) / (c1 + c2), cross_entropy(logits, labels), rtol=1e-6)
    assert abs((s1 / c1 + s2 / c2) / 2 - cross_entropy(logits, labels)) > 1e-3
