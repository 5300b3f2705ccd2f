"""``output_hidden_states`` / ``output_attentions`` (``model.forward``, ``SpeechSeq2Seq.__call__``, ``model.encoder``,
``model.decoder``) against transformers 5.25 on tiny perturbed models with padded batches: every encoder family
(each with one decoder) and every decoder family (each with one of those encoders), each tuple's length, shapes and
values. Speech2Text2's decoder left transformers 5, so it is not among them (its layers are BART's, run by the same
code). transformers runs with eager attention, the one that returns attention probabilities."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch

import hf_factory as F
from speechseq import model as M
from speechseq.errors import InputError
from test_conformer import conformer_config, perturb_batch_norms
from test_sew import sew_config

TOL = dict(rtol=1e-4, atol=1e-5)


def _w2v(name: str):
    return lambda dec: F.seq2seq_from_configs(F.encoder_config(name), F.decoder_config(dec))


def _more(name: str):
    return lambda dec: F.seq2seq_from_configs(F.more_encoder_config(name), F.decoder_config(dec))


# encoder variant: (transformers model builder given a decoder name, the decoder it is paired with). The pairs also
# cover every decoder family of the registry that transformers 5.25 has.
PAIRS = {
    "w2v-post": (_w2v("w2v-group"), "bert"),
    "w2v-stable": (_w2v("w2v-layer-stable"), "mbart"),  # pre-norm encoder, pre-norm decoder with a final norm
    "hubert": (_w2v("hubert"), "gpt2"),
    "wavlm": (_more("wavlm"), "bart"),
    "wavlm-stable": (_more("wavlm-stable"), "roberta"),
    "data2vec-audio": (_more("data2vec-audio"), "marian"),
    "unispeech": (_more("unispeech"), "pegasus"),
    "unispeech-sat": (_more("unispeech-sat"), "xglm"),
    "sew": (lambda dec: F.seq2seq_from_configs(sew_config("sew"), F.decoder_config(dec)), "blenderbot-small"),
    "sew-d": (lambda dec: F.seq2seq_from_configs(sew_config("sew-d"), F.decoder_config(dec)), "trocr"),
    "conformer": (lambda dec: perturb_batch_norms(F.seq2seq_from_configs(conformer_config("relative"),
                                                                         F.decoder_config(dec))), "xlm-roberta"),
    "conformer-rotary": (lambda dec: perturb_batch_norms(F.seq2seq_from_configs(conformer_config("rotary"),
                                                                                F.decoder_config(dec))), "electra"),
    "speech_to_text": (lambda dec: F.speech_to_text_seq2seq(dec), "bert-generation"),
}
def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' eager attention in every part (the one that returns probabilities); the parts that have no
    other ignore the request."""
    for part in (model, model.encoder, model.decoder):
        try:
            part.set_attn_implementation("eager")
        except (ValueError, AttributeError):
            pass
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model) per PAIRS entry."""
    get = F.checkpoint_zoo(tmp_path_factory, lambda enc: _eager(PAIRS[enc][0](PAIRS[enc][1])))
    return get


def _inputs(enc: str) -> dict:
    """A padded batch of two utterances of the encoder's input kind, with decoder ids and a decoder mask that pads
    the second row's last token."""
    if enc == "speech_to_text":
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 40, 80)).astype(np.float32)
        mask = np.ones((2, 40), np.int64)
        mask[1, 27:] = 0
        x[1, 27:] = 0
        kind = "input_features"
    else:
        x, mask = F.audio_batch((1600, 1100))
        kind = "input_values"
    ids = F.tokens(2, 6)
    dmask = np.ones((2, 6), np.int64)
    dmask[1, -1] = 0
    return {kind: x, "attention_mask": mask, "decoder_input_ids": ids, "decoder_attention_mask": dmask}


def assert_tuples_match(got, want, name: str) -> None:
    """Same length, shapes and values, every frame compared (padding frames included: computed alike here)."""
    assert want is not None and len(want) > 0, f"{name}: transformers returned none"
    assert got is not None and len(got) == len(want), (name, None if got is None else len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = F.to_numpy(g), F.to_numpy(w)
        assert g.shape == w.shape, (name, i, g.shape, w.shape)
        np.testing.assert_allclose(g, w, **TOL, err_msg=f"{name}[{i}]")


@pytest.mark.parametrize("enc", list(PAIRS))
def test_outputs_match_transformers(zoo, enc):
    hf, ours = zoo(enc)
    inputs = _inputs(enc)
    want = F.hf_forward(hf, **inputs, output_hidden_states=True, output_attentions=True)
    got = ours(**inputs, output_hidden_states=True, output_attentions=True)
    np.testing.assert_allclose(F.to_numpy(got.logits), F.to_numpy(want.logits), **TOL)
    assert len(want.encoder_hidden_states) == 3  # two layers: their input and each one's output
    assert_tuples_match(got.encoder_hidden_states, want.encoder_hidden_states, "encoder_hidden_states")
    assert_tuples_match(got.encoder_attentions, want.encoder_attentions, "encoder_attentions")
    assert_tuples_match(got.decoder_hidden_states, want.decoder_hidden_states, "decoder_hidden_states")
    assert_tuples_match(got.decoder_attentions, want.decoder_attentions, "decoder_attentions")
    assert_tuples_match(got.cross_attentions, want.cross_attentions, "cross_attentions")


def test_one_flag_alone_and_none_without(zoo):
    """Each flag gives its own tuples only (transformers' rule); without flags the output carries none and the
    logits are those of the capturing program (to rounding: two programs, which XLA may fuse differently)."""
    hf, ours = zoo("w2v-stable")
    inputs = _inputs("w2v-stable")
    hidden = ours(**inputs, output_hidden_states=True)
    assert hidden.encoder_attentions is None and hidden.decoder_attentions is None and hidden.cross_attentions is None
    want = F.hf_forward(hf, **inputs, output_hidden_states=True)
    assert_tuples_match(hidden.decoder_hidden_states, want.decoder_hidden_states, "decoder_hidden_states")
    plain = ours(**inputs)
    assert all(getattr(plain, k) is None for k in ("encoder_hidden_states", "encoder_attentions",
                                                    "decoder_hidden_states", "decoder_attentions", "cross_attentions"))
    np.testing.assert_allclose(np.asarray(plain.logits), np.asarray(hidden.logits), rtol=0, atol=1e-6)


def test_encoder_and_decoder_alone(zoo):
    """``model.encoder`` / ``model.decoder`` take the flags as transformers' standalone encoder and causal LM do."""
    hf, ours = zoo("hubert")
    inputs = _inputs("hubert")
    x, mask = torch.as_tensor(inputs["input_values"]), torch.as_tensor(inputs["attention_mask"])
    with torch.no_grad():
        want = hf.encoder(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    got = ours.encoder(inputs["input_values"], inputs["attention_mask"], output_hidden_states=True,
                       output_attentions=True)
    assert_tuples_match(got.hidden_states, want.hidden_states, "hidden_states")
    assert_tuples_match(got.attentions, want.attentions, "attentions")

    frames = np.random.default_rng(3).normal(size=(2, 9, ours.config.decoder.hidden_size)).astype(np.float32)
    frame_mask = np.ones((2, 9), np.int64)
    frame_mask[1, 6:] = 0
    with torch.no_grad():
        want = hf.decoder(input_ids=torch.as_tensor(inputs["decoder_input_ids"]),
                          attention_mask=torch.as_tensor(inputs["decoder_attention_mask"]),
                          encoder_hidden_states=torch.as_tensor(frames),
                          encoder_attention_mask=torch.as_tensor(frame_mask),
                          output_hidden_states=True, output_attentions=True)
    got = ours.decoder(inputs["decoder_input_ids"], frames, frame_mask, inputs["decoder_attention_mask"],
                       output_hidden_states=True, output_attentions=True)
    np.testing.assert_allclose(np.asarray(got.logits), F.to_numpy(want.logits), **TOL)
    assert_tuples_match(got.hidden_states, want.hidden_states, "hidden_states")
    assert_tuples_match(got.attentions, want.attentions, "attentions")
    assert_tuples_match(got.cross_attentions, want.cross_attentions, "cross_attentions")


def test_bad_requests_are_one_line_errors(zoo):
    """With LayerDrop on in training mode transformers' tuples lose a random number of layers: a one-line error
    naming the part (dropout alone is fine: probabilities after dropout, as transformers'). A flag that is not a
    bool (transformers 5's lists of layer indices) is refused in one line too."""
    _, ours = zoo("w2v-post")
    inputs = _inputs("w2v-post")
    with pytest.raises(InputError, match=r"^output_hidden_states: expected True or False, got \[0, 2\]$"):
        ours(**inputs, output_hidden_states=[0, 2])
    with pytest.raises(InputError, match="^output_attentions: expected True or False"):
        ours.decoder(inputs["decoder_input_ids"], np.zeros((2, 3, 20), np.float32), output_attentions="yes")
    key = jax.random.key(0)
    cfg = ours.config
    for part in ("encoder", "decoder"):
        dropping = dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), layerdrop=0.5)})
        with pytest.raises(InputError, match=f"the {part}'s LayerDrop") as err:  # raised while tracing
            jax.eval_shape(lambda p: M.forward(dropping, p, inputs["input_values"], inputs["attention_mask"],
                                               inputs["decoder_input_ids"], rng=key, output_attentions=True),
                           ours.params)
        assert "\n" not in str(err.value)
