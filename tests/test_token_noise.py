"""Decoder input noise of the train step (``StepConfig.token_noise``): which tokens it replaces and how often, that
the loss it trains on is transformers' loss for those noisy decoder inputs with the labels unchanged, and that it is
off in eval mode."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from speechseq import SpeechSeq2Seq
from speechseq.errors import ConfigError
from speechseq.layers.core import fold
from speechseq.model import shift_right
from speechseq.training import StepConfig
from speechseq.training.step import _TOKEN_NOISE, loss_sum, noisy_decoder_inputs
from test_training_step import padded_batch, reference

P = 0.25


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("noise")
    hf = reference("w2v-group", "bart")  # dropout 0 and SpecAugment off: the noise is the only randomness
    hf.save_pretrained(path)
    return hf, SpeechSeq2Seq.from_pretrained(path)


def test_noise_replaces_a_fraction_of_the_tokens_after_the_start(model):
    _, ours = model
    cfg = ours.config
    labels = np.full((64, 40), -100, np.int32)
    rng = np.random.default_rng(0)
    for i, n in enumerate(rng.integers(1, 41, 64)):
        labels[i, :n] = rng.integers(3, cfg.decoder.vocab_size, n)
    clean = np.asarray(shift_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id))
    noisy = np.asarray(noisy_decoder_inputs(cfg, labels, P, jax.random.PRNGKey(1)))
    assert noisy.shape == clean.shape and noisy.dtype == clean.dtype
    assert (noisy[:, 0] == cfg.decoder_start_token_id).all()  # the start token is always given
    pad = clean == cfg.pad_token_id
    np.testing.assert_array_equal(noisy[pad], clean[pad])  # padding stays padding
    assert ((noisy >= 0) & (noisy < cfg.decoder.vocab_size)).all()
    changed = (noisy != clean)[:, 1:][~pad[:, 1:]]
    # a replacement draws the same token back with probability 1 / vocab_size
    expected = P * (1 - 1 / cfg.decoder.vocab_size)
    assert abs(changed.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / changed.size), changed.mean()
    np.testing.assert_array_equal(noisy, noisy_decoder_inputs(cfg, labels, P, jax.random.PRNGKey(1)))  # same key
    assert (noisy != np.asarray(noisy_decoder_inputs(cfg, labels, P, jax.random.PRNGKey(2)))).any()


def test_loss_is_transformers_loss_of_the_noisy_inputs(model):
    hf, ours = model
    batch = padded_batch()
    step = StepConfig(token_noise=P)
    key = jax.random.PRNGKey(5)
    total, count = loss_sum(ours.config, ours.params, batch, step, key)
    # loss_sum draws the noise at its site of the step's key
    noisy = np.array(noisy_decoder_inputs(ours.config, batch["labels"], P, fold(key, _TOKEN_NOISE)))
    clean = np.asarray(shift_right(batch["labels"], ours.config.pad_token_id, ours.config.decoder_start_token_id))
    assert (noisy != clean).any()
    with torch.no_grad():
        want = hf(input_values=torch.from_numpy(batch["input_values"]),
                  attention_mask=torch.from_numpy(batch["attention_mask"]),
                  decoder_input_ids=torch.from_numpy(noisy).long(),
                  labels=torch.from_numpy(batch["labels"]).long()).loss.item()
        clean_loss = hf(input_values=torch.from_numpy(batch["input_values"]),
                        attention_mask=torch.from_numpy(batch["attention_mask"]),
                        labels=torch.from_numpy(batch["labels"]).long()).loss.item()
    got = float(total / count)
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    assert abs(got - clean_loss) > 1e-3  # the noise changed what the decoder saw
    # eval mode (no key): the inputs transformers makes, no noise
    total, count = loss_sum(ours.config, ours.params, batch, step, None)
    assert abs(float(total / count) - clean_loss) <= 1e-5 * clean_loss


def test_bad_rate_is_one_line():
    with pytest.raises(ConfigError, match="step.token_noise"):
        StepConfig(token_noise=1.5)
