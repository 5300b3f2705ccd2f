"""Numeric parity with transformers' ``SpeechEncoderDecoderModel`` on tiny perturbed models: every encoder variant
times every decoder family, padded audio batches, labels with -100, right-padded decoder inputs, untied heads,
precomputed encoder outputs and bfloat16 compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_factory as F

# "w2v-adapter" (24 wide) cannot run in transformers with a 20-wide decoder: see test_warm_start for it.
ENCODERS = [name for name in F.ENCODERS if name != "w2v-adapter"] + ["w2v-adapter-20"]
LOGITS_TOL = 1e-4
HIDDEN_TOL = 1e-4
LOSS_RTOL = 1e-5
PAD = 1  # pad_token_id of the factory decoders


def labels_with_ignored() -> np.ndarray:
    labels = F.tokens(2, 7)
    labels[1, 5:] = -100
    return labels


def right_padded_ids() -> tuple[np.ndarray, np.ndarray]:
    ids = F.tokens(2, 7, seed=3)
    mask = np.ones_like(ids)
    ids[1, 4:] = PAD
    mask[1, 4:] = 0
    return ids, mask


def contiguous_output(module, inputs, output) -> None:
    """transformers' adapter returns a transposed (non-contiguous) tensor, and without an enc_to_dec_proj in between
    GPT-2's cross-attention ``Conv1D`` fails on it (``x.view``); a copy changes no value."""
    output.last_hidden_state = output.last_hidden_state.contiguous()


def hooked_seq2seq(enc: str, dec: str, tie: bool = True):
    hf = F.any_seq2seq(enc, dec, tie=tie)
    hf.encoder.register_forward_hook(contiguous_output)
    return hf


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model loaded from its checkpoint), built once per (encoder, decoder, tie)."""
    return F.checkpoint_zoo(tmp_path_factory, hooked_seq2seq)


def assert_parity(got, want, with_loss: bool) -> None:
    assert got.logits.shape == tuple(want.logits.shape)
    assert F.max_abs_diff(got.logits, want.logits) <= LOGITS_TOL
    assert F.max_abs_diff(got.encoder_last_hidden_state, want.encoder_last_hidden_state) <= HIDDEN_TOL
    if with_loss:
        assert abs(float(got.loss) - float(want.loss)) <= LOSS_RTOL * abs(float(want.loss))
    else:
        assert got.loss is None and want.loss is None


def assert_depends_on_audio(a: np.ndarray, b: np.ndarray) -> None:
    """Logits of two different audio batches differ in every row (so a parity check cannot pass trivially)."""
    for row in range(a.shape[0]):
        assert np.abs(a[row] - b[row]).max() > 1e-3, f"row {row}: logits do not depend on the audio"


def check_labels_parity(hf, ours) -> None:
    """Padded audio (1600 and 1100 samples) and an all-ones mask, labels with -100 in one row: logits, encoder
    output and loss equal transformers', and the logits depend on the audio."""
    labels = labels_with_ignored()
    logits = []
    for seed, lengths in ((0, (1600, 1100)), (1, (1600, 1600))):
        x, mask = F.audio_batch(lengths, seed)
        want = F.hf_forward(hf, input_values=x, attention_mask=mask, labels=labels)
        got = ours(x, mask, labels=labels)
        assert_parity(got, want, with_loss=True)
        logits.append(np.asarray(got.logits))
    assert_depends_on_audio(*logits)


@pytest.mark.parametrize("dec", F.DECODERS)
@pytest.mark.parametrize("enc", ENCODERS)
def test_labels(zoo, enc, dec):
    """Padded audio (1600 and 1100 samples) and an all-ones mask; labels with -100 in one row."""
    hf, ours = zoo(enc, dec)
    check_labels_parity(hf, ours)


# Decoder-side masking does not depend on the encoder variant, and each case costs a compile (~2 s on 2 cores; the
# full 8 x 7 product took the file from ~2.5 to ~4 minutes): every decoder with one encoder that needs
# enc_to_dec_proj (16 -> 20) and one whose adapter shortens the frame mask and needs none.
@pytest.mark.parametrize("dec", F.DECODERS)
@pytest.mark.parametrize("enc", ["w2v-group", "w2v-adapter-20"])
def test_decoder_inputs(zoo, enc, dec):
    """decoder_input_ids with right padding and its decoder_attention_mask, no labels."""
    hf, ours = zoo(enc, dec)
    ids, dmask = right_padded_ids()
    x, mask = F.audio_batch((1600, 1100))
    want = F.hf_forward(hf, input_values=x, attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=dmask)
    got = ours(x, mask, decoder_input_ids=ids, decoder_attention_mask=dmask)
    assert_parity(got, want, with_loss=False)


@pytest.mark.parametrize("enc", ["w2v-group", "w2v-layer-stable", "hubert"])
def test_no_attention_mask(zoo, enc):
    """Audio without a sample mask (how group-norm checkpoints are fed)."""
    hf, ours = zoo(enc, "bert")
    labels = labels_with_ignored()
    x, _ = F.audio_batch((1600, 1300))
    want = F.hf_forward(hf, input_values=x, labels=labels)
    got = ours(x, labels=labels)
    assert_parity(got, want, with_loss=True)


@pytest.mark.parametrize("dec", F.DECODERS)
def test_untied_embeddings(zoo, dec):
    hf, ours = zoo("w2v-layer-stable", dec, tie=False)
    head, table = hf.decoder.get_output_embeddings().weight, hf.decoder.get_input_embeddings().weight
    assert head.data_ptr() != table.data_ptr() and not torch.equal(head, table)
    labels = labels_with_ignored()
    x, mask = F.audio_batch((1600, 1100))
    want = F.hf_forward(hf, input_values=x, attention_mask=mask, labels=labels)
    assert_parity(ours(x, mask, labels=labels), want, with_loss=True)


@pytest.mark.parametrize("enc,dec", [("w2v-adapter-20", "bart"), ("hubert", "gpt2"), ("w2v-group", "roberta")])
def test_precomputed_encoder_outputs(zoo, enc, dec):
    hf, ours = zoo(enc, dec)
    labels = labels_with_ignored()
    x, mask = F.audio_batch((1600, 1100))
    full = ours(x, mask, labels=labels)
    encoded = ours.encode(x, mask)
    hf_encoded = F.hf_forward(hf.encoder, input_values=x, attention_mask=mask)
    assert F.max_abs_diff(encoded.last_hidden_state, hf_encoded.last_hidden_state) <= HIDDEN_TOL
    reused = ours(encoder_outputs=encoded, labels=labels)
    np.testing.assert_allclose(np.asarray(reused.logits), np.asarray(full.logits), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(reused.loss), float(full.loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(reused.encoder_last_hidden_state),  # two programs: equal to rounding
                               np.asarray(full.encoder_last_hidden_state), rtol=1e-6, atol=1e-6)
    want = F.hf_forward(hf, encoder_outputs=(hf_encoded.last_hidden_state,), attention_mask=mask, labels=labels)
    assert_parity(reused, want, with_loss=True)


@pytest.mark.parametrize("enc,dec", [("w2v-adapter-20", "bart"), ("w2v-group", "roberta")])
def test_encoder_outputs_without_frame_mask(zoo, enc, dec):
    """Precomputed frames without a frame mask, plus the sample mask: the frame mask comes from the sample mask
    (with the adapter's downsampling), as transformers' ``SpeechEncoderDecoderModel`` derives it for
    ``encoder_outputs=(hidden,)``; a frame mask the EncoderOutput carries is used as it is."""
    from speechseq.errors import InputError
    from speechseq.model import EncoderOutput

    hf, ours = zoo(enc, dec)
    ids, _ = right_padded_ids()
    x, mask = F.audio_batch((1600, 1100))
    hidden = F.hf_forward(hf.encoder, input_values=x, attention_mask=mask).last_hidden_state
    want = F.hf_forward(hf, encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=ids)
    frames = F.to_numpy(hidden)
    got = ours(encoder_outputs=EncoderOutput(frames, None), attention_mask=mask, decoder_input_ids=ids)
    assert F.max_abs_diff(got.logits, want.logits) <= 1e-5
    derived = ours.encode(x, mask).attention_mask
    assert not np.asarray(derived).all()  # the short clip's padding frames are masked: the check can fail
    np.testing.assert_array_equal(np.asarray(got.encoder_attention_mask), np.asarray(derived))
    if enc == "w2v-adapter-20":  # transformers' tuple form, read as transformers reads it: frames first
        as_tuple = ours(encoder_outputs=(frames,), attention_mask=mask, decoder_input_ids=ids)
        np.testing.assert_array_equal(np.asarray(as_tuple.logits), np.asarray(got.logits))
        with pytest.raises(InputError) as err:
            ours(encoder_outputs=frames, attention_mask=mask, decoder_input_ids=ids)
        assert str(err.value) == ("encoder_outputs: expected an EncoderOutput or a tuple whose first element is "
                                  "the frames [B, S, E], got an array")
    # a carried frame mask wins over the sample mask: all frames attended, as transformers without a mask
    unmasked = F.hf_forward(hf, encoder_outputs=(hidden,), decoder_input_ids=ids)
    assert F.max_abs_diff(unmasked.logits, want.logits) > 1e-5
    carried = ours(encoder_outputs=EncoderOutput(frames, np.ones(frames.shape[:2], bool)), attention_mask=mask,
                   decoder_input_ids=ids)
    assert F.max_abs_diff(carried.logits, unmasked.logits) <= 1e-5


@pytest.mark.parametrize("enc,dec", [("w2v-layer-stable", "mbart"), ("w2v-group", "gpt2"), ("hubert", "bert")])
def test_bfloat16_close_to_float32(zoo, enc, dec):
    _, ours = zoo(enc, dec)
    labels = labels_with_ignored()
    x, mask = F.audio_batch((1600, 1100))
    full = ours(x, mask, labels=labels)
    half = ours.astype("bfloat16")
    assert half.dtype == jnp.bfloat16 and ours.dtype == jnp.float32
    low = half(x, mask, labels=labels)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(half.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ours.params))
    assert low.logits.dtype == jnp.float32
    diff = F.max_abs_diff(low.logits, full.logits)
    assert 0 < diff < 0.15
    assert abs(float(low.loss) - float(full.loss)) < 0.05
    # the float32 model is untouched by astype
    assert np.array_equal(np.asarray(ours(x, mask, labels=labels).logits), np.asarray(full.logits))


@pytest.mark.parametrize("enc", ["w2v-layer-stable", "w2v-layer-post", "hubert-noprojnorm"])
@pytest.mark.parametrize("budget", [1, 4000])
def test_feature_encoder_windows(zoo, enc, budget, monkeypatch):
    """Layer-norm conv stacks run long audio in windows of whole frames (``wav2vec2.CHUNK_BYTES``, made tiny here so
    that this short audio takes one frame per window, or a few uneven windows): same encoder states as
    transformers for padded audio."""
    from speechseq import model as M
    from speechseq.encoders import wav2vec2

    hf, ours = zoo(enc, "bert")
    calls = []
    stack = wav2vec2._conv_stack
    monkeypatch.setattr(wav2vec2, "CHUNK_BYTES", budget)
    monkeypatch.setattr(wav2vec2, "_conv_stack", lambda *a: calls.append(a[2].shape) or stack(*a))
    x, mask = F.audio_batch((1700, 1100))
    encode = jax.jit(lambda p, x, m: M.encode(ours.config, p, x, m))  # a new function: traced afresh
    got = encode(ours.params, jnp.asarray(x), jnp.asarray(mask))
    want = F.hf_forward(hf.encoder, input_values=x, attention_mask=mask)
    assert len(calls) == 1 and calls[0][1] < x.shape[1], calls  # traced once, on a window shorter than the audio
    assert F.max_abs_diff(got.last_hidden_state, want.last_hidden_state) <= HIDDEN_TOL


@pytest.mark.parametrize("enc,dec", [("w2v-layer-stable", "bart"), ("w2v-group", "gpt2")])
def test_model_code_is_the_same_program_on_every_backend(zoo, enc, dec, monkeypatch):
    """The model's forward and its gradient are plain XLA ops on any backend: no optimisation barrier, no custom
    call (the CPU decode plan's kernels live under ``decoding/``), the same program whatever backend JAX reports,
    and transformers' numbers."""
    from speechseq import model as M

    hf, ours = zoo(enc, dec)
    labels = labels_with_ignored()
    x, mask = F.audio_batch((1600, 1100))
    args = (ours.params, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(labels))

    def loss(p, x, m, y):
        return M.forward(ours.config, p, x, m, labels=y).loss

    programs = {}
    for backend in ("cpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        programs[backend] = str(jax.make_jaxpr(jax.value_and_grad(loss))(*args))
    assert programs["cpu"] == programs["tpu"]
    for op in ("optimization_barrier", "custom_call", "ffi_call"):
        assert op not in programs["cpu"], op
    forward = jax.jit(lambda p, x, m, y: M.forward(ours.config, p, x, m, labels=y))
    want = F.hf_forward(hf, input_values=x, attention_mask=mask, labels=labels)
    assert_parity(forward(*args), want, with_loss=True)
