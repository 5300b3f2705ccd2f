"""SpecAugment (``layers.spec_augment``, applied by the wav2vec2 family's encoder in training mode) against
transformers: the masks' statistics over thousands of draws against ``_compute_mask_indices`` run as many times, the
masked frames and channels inside the encoder against transformers' own masking of the same indices, the key, the
switches, and ``masked_spec_embed`` in the weight table both ways."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq import model as M
from speechseq.checkpoints import convert
from speechseq.checkpoints.readers import open_checkpoint
from speechseq.encoders import wav2vec2
from speechseq.errors import ConfigError, InputError
from speechseq.layers.spec_augment import apply_masks, compute_mask, spec_augment_masks

DRAWS = 3000  # calls of each implementation per case; each call masks a batch of rows
HIDDEN_TOL = 1e-4  # test_parity's encoder tolerance


# ---------------------------------------------------------------------------------------------------- statistics


def runs(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masked runs of [..., S] bool masks: (runs per row [...], row index of each run, length of each run)."""
    flat = masks.reshape(-1, masks.shape[-1]).astype(np.int8)
    edges = np.diff(np.pad(flat, ((0, 0), (1, 1))), axis=1)
    row, start = np.nonzero(edges == 1)
    _, end = np.nonzero(edges == -1)
    return np.bincount(row, minlength=flat.shape[0]).reshape(masks.shape[:-1]), row, end - start


def draw_statistics(masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per draw (axis 0 of masks [DRAWS, B, S]), the statistics compared: each a [DRAWS, ...] array whose mean over
    the draws both implementations must share. Histograms are one-hot or count vectors, so their means are the
    probabilities (expected counts) of each bin. The batch total's variance (compared in
    ``assert_same_distribution``) is raised by the epsilon shared by a batch's rows."""
    n, B, S = masks.shape
    masked = masks.sum(-1)  # [n, B] masked positions per row
    per_row, run_row, run_len = runs(masks)
    draw_of_run = run_row // B
    lengths = np.zeros((n, S + 1))
    np.add.at(lengths, (draw_of_run, run_len), 1)
    total = masked.sum(-1).astype(np.float64)
    return {
        "masked fraction per row": masked / S,
        "masked positions per row (histogram)": np.eye(S + 1)[masked],
        "spans (runs) per row (histogram)": np.eye(S + 1)[per_row],
        "run lengths (histogram)": lengths,
        "masked positions per position": masks.astype(np.float64),
        "batch total": total,
    }


def assert_same_distribution(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Every statistic's mean over the draws agrees within 5 standard errors (from both samples' variances)."""
    got, want = draw_statistics(ours), draw_statistics(theirs)
    pooled = np.concatenate([got["batch total"], want["batch total"]]).mean()
    for stats in (got, want):  # its mean is the variance (plus the tiny squared offset of the pooled mean)
        stats["batch total variance"] = (stats["batch total"] - pooled) ** 2
    for name in want:
        a, b = got[name], want[name]
        se = np.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0])
        diff = np.abs(a.mean(0) - b.mean(0))
        bad = diff > 5 * se + 1e-12  # both constant: equal exactly
        assert not bad.any(), (f"{name}: at {np.argwhere(bad)[:5].tolist()} ours {a.mean(0)[bad][:5]} vs "
                               f"transformers {b.mean(0)[bad][:5]} (standard error {se[bad][:5]})")


def transformers_masks(shape, prob, span, min_masks, lengths) -> np.ndarray:
    np.random.seed(0)
    attention = None if lengths is None else torch.tensor(np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None])
    return np.stack([_compute_mask_indices(shape, prob, span, attention, min_masks) for _ in range(DRAWS)])


def our_masks(shape, prob, span, min_masks, lengths, seed: int = 0) -> np.ndarray:
    lengths = None if lengths is None else jnp.asarray(lengths)
    draw = jax.jit(jax.vmap(lambda k: compute_mask(k, shape, prob, span, min_masks, lengths)))
    return np.asarray(draw(jax.random.split(jax.random.key(seed), DRAWS)))


CASES = {
    # name: ((B, S), prob, span, min_masks, lengths)
    "time, no mask": ((4, 100), 0.25, 10, 2, None),  # 2.5 spans: 2 or 3 by the shared epsilon
    "time, lengths": ((4, 100), 0.3, 10, 2, [100, 73, 31, 8]),  # the last row is shorter than a span: no span
    "min masks": ((4, 50), 0.01, 5, 3, [50, 40, 12, 6]),  # min_masks rules; the shortest rows are capped
    "features": ((4, 16), 0.5, 4, 0, None),  # a channel axis (no lengths), probabilistic rounding of 2 spans
    "dense": ((3, 120), 0.65, 10, 2, None),  # wav2vec2 pre-training's rate: the S // span cap
}


@pytest.mark.parametrize("case", list(CASES))
def test_mask_statistics_match_transformers(case):
    shape, prob, span, min_masks, lengths = CASES[case]
    ours = our_masks(shape, prob, span, min_masks, lengths)
    theirs = transformers_masks(shape, prob, span, min_masks, lengths)
    assert ours.shape == theirs.shape and ours.dtype == bool
    assert_same_distribution(ours, theirs)
    if lengths is not None:  # nothing masked past a row's length but transformers' filler at the last position
        for row, length in enumerate(lengths):
            assert not ours[:, row, length:-1].any()
    if case == "min masks":  # every row that fits a span has one, however small the probability
        masked = ours.sum(-1)
        assert (masked[:, :3] >= span).all() and (masked[:, :3] <= min_masks * span).all()
        assert (masked[:, 3] >= span).all() and (masked[:, 3] <= 2 * span).all()  # 6 positions: starts 0 or 1


def test_statistics_catch_a_wrong_sampler():
    """The comparison above can fail: an epsilon drawn per row (instead of once per batch) keeps every row's
    distribution but not the batch's, and spans drawn with replacement mask less."""
    shape, prob, span, min_masks, lengths = CASES["time, no mask"]
    theirs = transformers_masks(shape, prob, span, min_masks, lengths)
    per_row = np.concatenate([our_masks((1, shape[1]), prob, span, min_masks, None, seed=s)
                              for s in range(shape[0])], axis=1)
    with pytest.raises(AssertionError, match="batch total variance"):
        assert_same_distribution(per_row, theirs)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, shape[1] - span + 1, (DRAWS, shape[0], 2))  # 2 spans (eps rounding ignored)
    t = np.arange(shape[1])
    replaced = ((t >= starts[..., None]) & (t < starts[..., None] + span)).any(-2)
    with pytest.raises(AssertionError):
        assert_same_distribution(replaced, theirs)


def test_same_key_same_masks():
    shape, prob, span, min_masks, lengths = CASES["time, lengths"]
    draw = jax.jit(lambda k: compute_mask(k, shape, prob, span, min_masks, jnp.asarray(lengths)))
    a, b, c = (np.asarray(draw(jax.random.key(k))) for k in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_span_longer_than_the_axis_is_an_input_error():
    with pytest.raises(InputError, match=r"^mask_time_length: 12 is longer than the 10 positions it masks$"):
        compute_mask(jax.random.key(0), (2, 10), 0.5, 12, name="mask_time_length")


def test_masked_frames_hold_the_embedding_and_channels_are_zeroed():
    h = jax.random.normal(jax.random.key(3), (3, 40, 16))
    embed = jax.random.normal(jax.random.key(4), (16,))

    @jax.jit
    def augment(key, h, embed):
        time, feature = spec_augment_masks(key, h.shape, jnp.asarray([40, 30, 20]), mask_time_prob=0.3,
                                           mask_time_length=4, mask_time_min_masks=2, mask_feature_prob=0.3,
                                           mask_feature_length=3, mask_feature_min_masks=1)
        return apply_masks(h, time, feature, embed), time, feature

    out, time, feature = map(np.asarray, augment(jax.random.key(5), h, embed))
    assert time.any() and feature.any() and not time.all() and not feature.all()
    want = np.where(time[:, :, None], np.asarray(embed), np.asarray(h))  # masked frames: the embedding itself
    want[np.broadcast_to(feature[:, None, :], want.shape)] = 0  # then channels, in every frame, as transformers
    np.testing.assert_array_equal(out, want)
    none = spec_augment_masks(jax.random.key(5), h.shape, None, mask_time_prob=0.0, mask_time_length=4,
                              mask_time_min_masks=2, mask_feature_prob=0.0, mask_feature_length=3,
                              mask_feature_min_masks=1)
    assert none == (None, None)  # a zero probability masks nothing, whatever min_masks says (transformers' rule)


# ---------------------------------------------------------------------------------------------------- the encoder


def spec_model(path, enc: str, **overrides) -> tuple[T.SpeechEncoderDecoderModel, SpeechSeq2Seq]:
    """(transformers model, ours loaded from its checkpoint) for a factory encoder with SpecAugment settings; every
    dropout and LayerDrop rate is 0 (the factory's), so with a key SpecAugment is the only randomness."""
    hf = F.seq2seq_from_configs(F.any_encoder_config(enc, **overrides), F.decoder_config("bert"))
    hf.save_pretrained(path)
    return hf, SpeechSeq2Seq.from_pretrained(path)


def hf_encode(hf: T.SpeechEncoderDecoderModel, x: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return hf.encoder(torch.tensor(x), attention_mask=torch.tensor(mask), **kwargs).last_hidden_state.numpy()


def real_frames(out: M.EncoderOutput) -> np.ndarray:
    """Encoder frames with padding frames zeroed (transformers leaves other values there)."""
    return np.where(np.asarray(out.attention_mask)[:, :, None], np.asarray(out.last_hidden_state), 0)


@pytest.mark.parametrize("enc", ["w2v-group", "hubert"])
def test_encoder_masks_as_transformers_does(tmp_path, enc, monkeypatch):
    """Our encoder in training mode equals transformers' given the same masks: the time mask through its
    ``mask_time_indices`` argument (masked frames hold ``masked_spec_embed``), the channel mask zeroing the feature
    projection's output as ``_mask_hidden_states`` does. wav2vec2 draws time spans within each row's length,
    HuBERT over the padded length (its model passes no attention mask to the masking)."""
    hf, ours = spec_model(tmp_path, enc, mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.4,
                          mask_feature_length=2)
    drawn = []

    def spy(*args, real=wav2vec2.spec_augment_masks, **kwargs):
        drawn.append((args, real(*args, **kwargs)))
        return drawn[-1][1]

    monkeypatch.setattr(wav2vec2, "spec_augment_masks", spy)
    x, mask = F.audio_batch((1600, 1100))
    got = M.encode(ours.config, ours.params, jnp.asarray(x), jnp.asarray(mask), rng=jax.random.key(0))  # eager
    (args, (time, feature)), = drawn
    time, feature = np.asarray(time), np.asarray(feature)
    frames = np.asarray(got.attention_mask).sum(-1)
    assert time.any() and feature.any() and frames[1] < frames[0]
    if enc == "hubert":
        assert args[2] is None
    else:
        np.testing.assert_array_equal(np.asarray(args[2]), frames)
        assert not time[1, frames[1]:-1].any()

    def mask_then_zero_channels(hidden, *args, real=hf.encoder._mask_hidden_states, **kwargs):
        # transformers' own time masking (from mask_time_indices), then its channel masking with our channels
        return real(hidden, *args, **kwargs).masked_fill(torch.tensor(feature)[:, None, :], 0.0)

    hf.encoder._mask_hidden_states = mask_then_zero_channels
    want = hf_encode(hf, x, mask, mask_time_indices=torch.tensor(time))
    assert F.max_abs_diff(real_frames(got), np.where(np.asarray(got.attention_mask)[:, :, None], want, 0)) \
        <= HIDDEN_TOL
    plain = M.encode(ours.config, ours.params, jnp.asarray(x), jnp.asarray(mask))
    assert F.max_abs_diff(real_frames(got), real_frames(plain)) > 1e-2  # the masks changed the output


def test_key_switches_and_eval_mode(tmp_path):
    """The same key gives the same output; no key, or apply_spec_augment=False, gives transformers' eval output."""
    hf, ours = spec_model(tmp_path, "w2v-group", mask_time_prob=0.3, mask_time_length=3, mask_feature_prob=0.4,
                          mask_feature_length=2)
    x, mask = F.audio_batch((1600, 1100))
    frames = np.asarray(ours.encode(x, mask).attention_mask)[:, :, None]
    want = np.where(frames, hf_encode(hf, x, mask), 0)
    enc = jax.jit(M.encode, static_argnames=("cfg",))
    a, b, c = (real_frames(enc(ours.config, ours.params, x, mask, rng=jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3) and not np.allclose(a, want, atol=1e-3)
    off = dataclasses.replace(ours.config, encoder=dataclasses.replace(ours.config.encoder, apply_spec_augment=False))
    for cfg, rng in ((ours.config, None), (off, jax.random.key(0))):
        assert F.max_abs_diff(real_frames(enc(cfg, ours.params, x, mask, rng=rng)), want) <= HIDDEN_TOL
    assert off.to_dict()["encoder"]["apply_spec_augment"] is False  # the switch is a config field written back


def test_time_masking_without_the_embedding_is_refused(tmp_path):
    """Only a replace() makes a config that masks time without masked_spec_embed: one line, naming it."""
    _, ours = spec_model(tmp_path, "w2v-group", mask_time_prob=0.0)
    assert not ours.config.encoder.masked_spec_embed
    bad = dataclasses.replace(ours.config.encoder, mask_time_prob=0.2)
    x, mask = F.audio_batch()
    with pytest.raises(ConfigError, match=r"^wav2vec2: mask_time_prob 0.2 needs the masked_spec_embed weight"):
        wav2vec2.encode(bad, ours.params["encoder"], jnp.asarray(x), jnp.asarray(mask), rng=jax.random.key(0))


# ---------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("time_prob,feature_prob", [(0.0, 0.1), (0.0, 0.0)])
def test_masked_spec_embed_in_the_weight_table_both_ways(tmp_path, time_prob, feature_prob):
    """transformers makes ``masked_spec_embed`` when either probability is above 0: we read it, write it back and
    keep it through convert and export; without it nothing asks for it."""
    hf = F.seq2seq_from_configs(F.any_encoder_config("w2v-group", mask_time_prob=time_prob,
                                                     mask_feature_prob=feature_prob),
                                F.decoder_config("bert", tie=False))  # untied: every tensor is saved
    has = time_prob > 0 or feature_prob > 0
    assert hasattr(hf.encoder, "masked_spec_embed") == has
    hf.save_pretrained(tmp_path / "hf")
    ours = SpeechSeq2Seq.from_pretrained(tmp_path / "hf")
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    assert ("masked_spec_embed" in ours.params["encoder"]) == has
    F.assert_same_state_dict(ours.state_dict(), hf.state_dict())
    convert.convert(tmp_path / "hf", tmp_path / "ours", progress=False)
    convert.export(tmp_path / "ours", tmp_path / "back", progress=False)
    with open_checkpoint(tmp_path / "back") as ckpt:
        back = {k: np.asarray(ckpt[k]) for k in ckpt}
    F.assert_same_state_dict(back, hf.state_dict())
    if has:
        np.testing.assert_array_equal(back["encoder.masked_spec_embed"], hf.encoder.masked_spec_embed.detach().numpy())
