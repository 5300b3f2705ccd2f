"""The rest of transformers' ``SpeechEncoderDecoderModel.forward`` keywords against transformers 5.25 on tiny perturbed
models (one 16-wide waveform encoder under every decoder family, and Speech2Text's filterbank encoder): ``inputs=``
for either kind of encoder input, float 0/1 masks, ``decoder_inputs_embeds`` in place of ids for every decoder family
(positions, token types, norms and scaling as each family adds them to given embeddings), the one-line errors, and
``freeze_feature_encoder`` as an optimizer setting that freezes what transformers freezes."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq import model as M
from speechseq.checkpoints.table import flatten
from speechseq.errors import ConfigError, InputError
from speechseq.training import OptimConfig
from speechseq.training.optim import partition
from test_parity import assert_parity, labels_with_ignored, right_padded_ids

ENC = "w2v-layer-stable"  # 16 wide: the 20-wide decoders need enc_to_dec_proj
# every decoder family of the registry that transformers 5.25 runs; "bart-scaled" (scale_embedding) is where a
# given embedding must not be scaled, Marian and Pegasus (scaled) where it must; "trocr-sinusoidal" is refused
DECODERS = ["bert", "roberta", "gpt2", "bart", "bart-scaled", "mbart", *F.MORE_DECODERS]
S2T2 = Path(__file__).parent / "reference" / "speech2text2" / "tied"  # Speech2Text2 left transformers 5
BOTH = "decoder_inputs_embeds: give decoder_input_ids or decoder_inputs_embeds, not both"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model from its checkpoint) per decoder, all with the ``ENC`` encoder."""
    return F.checkpoint_zoo(tmp_path_factory, lambda dec: F.any_seq2seq(ENC, dec))


@pytest.fixture(scope="module")
def s2t(tmp_path_factory):
    """(transformers model with Speech2Text's filterbank encoder and a BART decoder, speechseq's from its checkpoint)."""
    hf = F.speech_to_text_seq2seq("bart")
    path = tmp_path_factory.mktemp("s2t")
    hf.save_pretrained(path)
    return hf, SpeechSeq2Seq.from_pretrained(path)


def features_batch(frames=(64, 45), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Padded filterbank-like features [B, S, 80] float32 and their frame mask [B, S] int32."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(frames), max(frames), 80), np.float32)
    mask = np.zeros((len(frames), max(frames)), np.int32)
    for i, n in enumerate(frames):
        x[i, :n] = rng.normal(0, 1, (n, 80))
        mask[i, :n] = 1
    return x, mask


def embeddings_of(hf, ids: np.ndarray, seed: int = 5) -> np.ndarray:
    """Rows of the decoder's token table for ``ids`` [B, T] (unscaled, as the embedding module holds them), each
    times its own random factor, plus a little noise (a norm right after the embeddings would undo a factor alone):
    [B, T, D] float32."""
    table = F.to_numpy(hf.decoder.get_input_embeddings().weight)
    rng = np.random.default_rng(seed)
    factor = rng.uniform(0.5, 1.5, ids.shape + (1,))
    return (table[ids] * factor + rng.normal(0, 0.05, ids.shape + table.shape[1:])).astype(np.float32)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---- inputs= -------------------------------------------------------------------------------------------------------


def test_inputs_waveform(zoo):
    """``inputs=`` (and the first positional argument) is the audio for a waveform encoder: transformers' numbers."""
    hf, ours = zoo("bart")
    x, mask = F.audio_batch((1600, 1100))
    labels = labels_with_ignored()
    want = F.hf_forward(hf, inputs=x, attention_mask=mask, labels=labels)
    got = ours(inputs=x, attention_mask=mask, labels=labels)
    assert_parity(got, want, with_loss=True)
    positional = ours(x, mask, labels=labels)
    np.testing.assert_array_equal(np.asarray(positional.logits), np.asarray(got.logits))
    by_name = ours(input_values=x, attention_mask=mask, labels=labels)
    np.testing.assert_array_equal(np.asarray(by_name.logits), np.asarray(got.logits))


def test_inputs_filterbank_and_float_mask(s2t):
    """``inputs=`` is the features for a filterbank encoder, here with its frame mask as float 0/1: transformers'
    numbers with the integer mask (transformers' ``Speech2TextEncoder`` fails on a float mask, indexing with the
    float lengths it derives from it; a 0/1 float mask has one meaning, so it is taken here)."""
    hf, ours = s2t
    x, mask = features_batch()
    labels = F.tokens(2, 6)
    labels[1, 4:] = -100
    fmask = mask.astype(np.float32)
    with pytest.raises(IndexError):  # if transformers starts taking float masks, compare with them instead
        F.hf_forward(hf, inputs=x, attention_mask=fmask, labels=labels)
    want = F.hf_forward(hf, inputs=x, attention_mask=mask, labels=labels)
    got = ours(inputs=x, attention_mask=fmask, labels=labels)
    assert_parity(got, want, with_loss=True)
    unmasked = F.hf_forward(hf, inputs=x, labels=labels)  # the mask matters here, so the float one was read
    assert F.max_abs_diff(unmasked.logits, want.logits) > 1e-4


def test_inputs_errors(zoo, s2t):
    _, ours = zoo("bart")
    _, fbank = s2t
    x, mask = F.audio_batch((1600, 1100))
    feats, _ = features_batch()
    ids = F.tokens(2, 4)
    cases = [
        (lambda: ours(inputs=x, input_values=x, decoder_input_ids=ids),
         "inputs: given together with input_values; give the encoder's input once"),
        (lambda: fbank(feats, input_features=feats, decoder_input_ids=ids),
         "inputs: given together with input_features; give the encoder's input once"),
        (lambda: M.forward(ours.config, ours.params, x, input_values=x, decoder_input_ids=ids),
         "inputs: given together with input_values; give the encoder's input once"),
        # audio to a filterbank encoder is named as audio; any other rank by what the encoder reads
        (lambda: ours(inputs=feats, decoder_input_ids=ids),
         "input_values: expected rank 2: raw audio [batch, samples], got shape (2, 64, 80)"),
        (lambda: fbank(inputs=x, decoder_input_ids=ids),
         "input_values: the speech_to_text encoder takes input_features (features [batch, frames, features])"),
        (lambda: M.forward(fbank.config, fbank.params, x, decoder_input_ids=ids),
         "input_values: the speech_to_text encoder takes input_features (features [batch, frames, features])"),
        (lambda: ours(inputs=x[0], decoder_input_ids=ids),
         "input_values: expected rank 2: raw audio [batch, samples], got shape (1600,)"),
        (lambda: ours(x, input_features=feats, decoder_input_ids=ids),  # the other kind by name: as before
         "input_features: the wav2vec2 encoder takes input_values (raw audio [batch, samples])"),
    ]
    for call, want in cases:
        with pytest.raises(InputError) as err:
            call()
        assert one_line(err) == want


# ---- float masks ---------------------------------------------------------------------------------------------------


def test_float_masks(zoo):
    """Float 0/1 sample and decoder masks on a padded batch: transformers' numbers with the same float masks."""
    hf, ours = zoo("roberta")
    x, mask = F.audio_batch((1600, 1100))
    ids, dmask = right_padded_ids()
    fmask, fdmask = mask.astype(np.float32), dmask.astype(np.float32)
    want = F.hf_forward(hf, input_values=x, attention_mask=fmask, decoder_input_ids=ids, decoder_attention_mask=fdmask)
    got = ours(x, fmask, decoder_input_ids=ids, decoder_attention_mask=fdmask)
    assert_parity(got, want, with_loss=False)
    # both masks matter here (so both float masks were read): transformers without either differs
    for kw in (dict(attention_mask=fmask), dict(decoder_attention_mask=fdmask)):
        assert F.max_abs_diff(F.hf_forward(hf, input_values=x, decoder_input_ids=ids, **kw).logits, want.logits) > 1e-4


def test_mask_values_other_than_0_1_refused(zoo):
    _, ours = zoo("roberta")
    x, mask = F.audio_batch((1600, 1100))
    ids, dmask = right_padded_ids()
    half = mask.astype(np.float32) * 0.5
    two = dmask * 2
    cases = [
        (lambda: ours(x, half, decoder_input_ids=ids),
         "attention_mask: expected 0/1 values (1 attend, 0 padding), got 0.5"),
        (lambda: ours(x, mask, decoder_input_ids=ids, decoder_attention_mask=two),
         "decoder_attention_mask: expected 0/1 values (1 attend, 0 padding), got 2"),
        (lambda: ours(x, jnp.asarray(half), decoder_input_ids=ids),  # on the device: checked there
         "attention_mask: expected 0/1 values (1 attend, 0 padding), got others"),
        (lambda: ours.encode(x, np.where(mask == 1, np.nan, 0.0)),
         "attention_mask: expected 0/1 values (1 attend, 0 padding), got nan"),
        (lambda: ours.generate(x, half, max_new_tokens=2),
         "attention_mask: expected 0/1 values (1 attend, 0 padding), got 0.5"),
    ]
    for call, want in cases:
        with pytest.raises(InputError) as err:
            call()
        assert one_line(err) == want


# ---- decoder_inputs_embeds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dec", DECODERS)
def test_decoder_inputs_embeds(zoo, dec):
    """Embeddings in place of right-padded ids, with their mask and labels (not shifted, as transformers does when
    embeddings are given): logits and loss equal transformers'. TrOCR with its sinusoidal table and Speech2Text2
    place positions by the ids only, and transformers fails without them: refused in one line."""
    hf, ours = zoo(dec)
    ids, dmask = right_padded_ids()
    embeds = embeddings_of(hf, ids)
    labels = labels_with_ignored()
    x, mask = F.audio_batch((1600, 1100))
    if ours.config.decoder.given_embeds == "unsupported":
        assert dec == "trocr-sinusoidal"
        with pytest.raises((AttributeError, TypeError)):  # transformers: None.size() in its position module
            F.hf_forward(hf, input_values=x, attention_mask=mask, decoder_inputs_embeds=embeds, labels=labels)
        with pytest.raises(InputError) as err:
            ours(x, mask, decoder_inputs_embeds=embeds, labels=labels)
        assert one_line(err) == ("decoder_inputs_embeds: the trocr decoder places its positions by the token ids "
                                 "(transformers fails without them too); give decoder_input_ids")
        return
    kw = dict(input_values=x, attention_mask=mask, decoder_attention_mask=dmask, labels=labels)
    want = F.hf_forward(hf, decoder_inputs_embeds=embeds, **kw)
    got = ours(x, mask, decoder_inputs_embeds=embeds, decoder_attention_mask=dmask, labels=labels)
    assert_parity(got, want, with_loss=True)
    # the embeddings are not the ids' own (or not placed as the ids' are): the check could fail
    from_ids = F.hf_forward(hf, decoder_input_ids=ids, **kw)
    assert F.max_abs_diff(from_ids.logits, want.logits) > 1e-3


def test_speech2text2_embeds_refused():
    """Speech2Text2 (transformers 4.x only) placed its sinusoidal positions by the ids: 4.46 fails on
    ``decoder_inputs_embeds`` (``embed_positions(None)``), so they are refused in one line."""
    ours = SpeechSeq2Seq.from_pretrained(S2T2)
    with pytest.raises(InputError) as err:
        ours(np.zeros((1, 1600), np.float32), decoder_inputs_embeds=np.zeros((1, 3, ours.config.decoder.hidden_size),
                                                                            np.float32))
    assert one_line(err) == ("decoder_inputs_embeds: the speech_to_text_2 decoder places its positions by the token "
                             "ids (transformers fails without them too); give decoder_input_ids")


def test_decoder_inputs_embeds_errors(zoo):
    hf, ours = zoo("bart")
    x, mask = F.audio_batch((1600, 1100))
    ids, _ = right_padded_ids()
    embeds = embeddings_of(hf, ids)
    with pytest.raises(ValueError, match="decoder_input_ids or decoder_inputs_embeds"):  # transformers refuses too
        F.hf_forward(hf, input_values=x, decoder_input_ids=ids, decoder_inputs_embeds=embeds)
    cases = [
        (lambda: ours(x, decoder_input_ids=ids, decoder_inputs_embeds=embeds), BOTH),
        (lambda: M.forward(ours.config, ours.params, x, decoder_input_ids=ids, decoder_inputs_embeds=embeds), BOTH),
        (lambda: ours(x, decoder_inputs_embeds=embeds[..., :5]),
         "decoder_inputs_embeds: expected [batch, tokens, 20] (the decoder's hidden size), got shape (2, 7, 5)"),
        (lambda: ours(x, decoder_inputs_embeds=ids),
         "decoder_inputs_embeds: expected [batch, tokens, 20] (the decoder's hidden size), got shape (2, 7)"),
        (lambda: ours(x, decoder_inputs_embeds=embeds.astype(np.int32)),
         "decoder_inputs_embeds: expected float values, got dtype int32"),
        (lambda: ours(x, decoder_inputs_embeds=np.where(embeds > 0, np.inf, embeds)),
         "decoder_inputs_embeds: contains NaN or infinite values"),
        (lambda: ours(x[:1], decoder_inputs_embeds=embeds),
         "decoder_inputs_embeds: batch 2 does not match the audio batch 1"),
        (lambda: ours(x, decoder_inputs_embeds=embeds, labels=F.tokens(2, 6)),
         "labels: shape (2, 6) does not match decoder_inputs_embeds (2, 7)"),
        (lambda: ours(x, decoder_inputs_embeds=embeds, decoder_attention_mask=np.ones((2, 6))),
         "decoder_attention_mask: expected shape (2, 7) like decoder_inputs_embeds, got (2, 6)"),
        (lambda: ours(x, decoder_inputs_embeds=np.zeros((2, 41, 20), np.float32)),
         "decoder_inputs_embeds: 41 tokens exceed the decoder's 40 positions"),
    ]
    for call, want in cases:
        with pytest.raises(InputError) as err:
            call()
        assert one_line(err) == want


# ---- freeze_feature_encoder -----------------------------------------------------------------------------------------


def test_freeze_feature_encoder(zoo, s2t):
    """The returned optimizer config freezes exactly the parameters transformers' ``freeze_feature_encoder`` takes
    out of training; the rest of the config is kept; an encoder without a feature encoder is refused, as
    transformers has no such method for it."""
    hf, ours = zoo("bart")
    optim = ours.freeze_feature_encoder(OptimConfig(learning_rate=3e-4, freeze=("decoder",)))
    assert optim == OptimConfig(learning_rate=3e-4, freeze=("decoder", "feature_encoder"))
    assert ours.freeze_feature_encoder() == OptimConfig(freeze=("feature_encoder",))
    assert ours.freeze_feature_encoder(optim) == optim  # already frozen: unchanged
    _, frozen = partition(ours.params, ours.freeze_feature_encoder().freeze)
    frozen_paths = set(flatten(frozen))
    ours_names = {r.names(i)[0] for r in M.weight_rules(ours.config) if frozen_paths & set(r.paths)
                  for i in range(r.num_layers)}
    hf.freeze_feature_encoder()
    try:
        theirs = {n for n, p in hf.named_parameters() if not p.requires_grad}
    finally:
        for p in hf.parameters():
            p.requires_grad_(True)
    assert theirs and ours_names == theirs
    hf_s2t, fbank = s2t
    with pytest.raises(AttributeError):
        hf_s2t.freeze_feature_encoder()
    with pytest.raises(ConfigError) as err:
        fbank.freeze_feature_encoder()
    assert one_line(err) == "optim.freeze: this model has no feature encoder to freeze"


@pytest.mark.parametrize("dec", ["bert", "gpt2"])
def test_encoder_and_decoder_alone(zoo, tmp_path, dec):
    """``model.encoder`` / ``model.decoder``: each saved alone is a checkpoint transformers' auto classes load
    (``Wav2Vec2Model``, the causal LM with its cross-attention) with exactly the whole model's tensors, and each
    called alone gives what transformers' part gives; both load back into a warm start unchanged."""
    import torch
    import transformers as T

    hf, ours = zoo(dec)
    x, mask = F.audio_batch((1600, 1100))
    ours.encoder.save_pretrained(tmp_path / "enc")
    ours.decoder.save_pretrained(tmp_path / "dec")
    hf_enc = T.AutoModel.from_pretrained(tmp_path / "enc").eval()
    hf_dec = T.AutoModelForCausalLM.from_pretrained(tmp_path / "dec").eval()
    for part, loaded in ((hf.encoder, hf_enc), (hf.decoder, hf_dec)):
        want = part.state_dict()
        assert sorted(loaded.state_dict()) == sorted(want)
        assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())

    enc = ours.encoder(x, mask)
    with torch.no_grad():
        frames = hf_enc(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).last_hidden_state
        np.testing.assert_allclose(np.asarray(enc.last_hidden_state), frames.numpy(), atol=2e-5)
        frames = hf.enc_to_dec_proj(frames)
        frame_mask = torch.from_numpy(np.asarray(enc.attention_mask)).long()
        ids = F.tokens(2, 5)
        want = hf_dec(input_ids=torch.from_numpy(ids), encoder_hidden_states=frames,
                      encoder_attention_mask=frame_mask).logits.numpy()
    got = ours.decoder(ids, frames.numpy(), encoder_attention_mask=frame_mask.numpy())
    np.testing.assert_allclose(np.asarray(got), want, atol=5e-5)
    with pytest.raises(InputError, match="encoder_hidden_states: expected"):
        ours.decoder(ids, frames.numpy()[..., :3])

    warm = SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec")
    whole, again = flatten(ours.params), flatten(warm.params)
    assert all(np.array_equal(again[p], whole[p]) for p in again if not p.startswith("enc_to_dec_proj"))
