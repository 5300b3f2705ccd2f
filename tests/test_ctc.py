"""The auxiliary CTC loss of the train step (``training.ctc``, ``StepConfig.ctc_weight``) against PyTorch: the
objective ``(1 - w) * attention + w * CTC`` built from transformers' model and ``torch.nn.functional.ctc_loss``, its
gradients, and a training run that keeps the head out of the saved model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.config import seq2seq_config_from_hf
from speechseq.errors import ConfigError
from speechseq.training import StepConfig, ctc
from speechseq.training.optim import decay_mask
from speechseq.training.step import loss_and_grad
from test_training_step import FLOOR_FACTOR, GRAD_RTOL, hf_named, reference

PAIR = ("w2v-group", "bert")  # an enc_to_dec_proj (16 -> 20) between the encoder and the CTC head
WEIGHT = 0.3
SPECIAL = (0, 1, 2)  # decoder start / BOS, pad (the blank), EOS of the factory's models


def ctc_batch() -> dict:
    """Padded audio and labels as a loader makes them: text tokens then EOS, -100 after; row 1 keeps the decoder
    start token in front (as when a batch's rows do not all start with it); row 2 has a repeated token; row 3
    has only EOS (an empty transcript: CTC scores it as all blanks)."""
    x, mask = F.audio_batch((1600, 1100, 1400, 1200), seed=3)
    text = F.tokens(4, 6, seed=3)
    text[2, 2] = text[2, 1]
    rows = [list(text[0]), [0, *text[1, :4]], list(text[2, :5]), []]
    labels = np.full((4, 8), -100, np.int32)
    for i, r in enumerate(rows):
        labels[i, :len(r) + 1] = [*r, 2]
    return {"input_values": x, "attention_mask": mask, "labels": labels}


def torch_objective(hf: torch.nn.Module, head: dict, batch: dict) -> tuple[torch.Tensor, dict]:
    """The objective per label token from transformers' model and ``F.ctc_loss``, and the head as torch tensors."""
    dtype = next(hf.parameters()).dtype
    x = torch.from_numpy(batch["input_values"]).to(dtype)
    mask = torch.from_numpy(batch["attention_mask"])
    labels = torch.from_numpy(batch["labels"]).long()
    enc = hf.encoder(x, attention_mask=mask)
    out = hf(attention_mask=mask, encoder_outputs=enc, labels=labels)
    tokens = (labels != -100).sum()
    frames = enc.last_hidden_state
    if hf.enc_to_dec_proj is not None:
        frames = hf.enc_to_dec_proj(frames)
    w = {k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=True) for k, v in head.items()}
    log_probs = torch.log_softmax(frames @ w["kernel"] + w["bias"], dim=-1)
    lengths = hf.encoder._get_feat_extract_output_lengths(mask.sum(-1))
    targets = [[t for t in row.tolist() if t != -100 and t not in SPECIAL] for row in labels]
    ctc_sum = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), torch.tensor(sum(targets, [])), lengths,
                                           torch.tensor([len(t) for t in targets]), blank=1, reduction="sum",
                                           zero_infinity=True)
    return ((1 - WEIGHT) * out.loss * tokens + WEIGHT * ctc_sum) / tokens, w


def test_objective_and_grads_match_pytorch(tmp_path):
    """Loss and every gradient (model and head) equal PyTorch's, per tensor within 1e-5 of its largest gradient or
    a few times torch's own fp32 noise floor (against float64), as the attention-only step is checked."""
    hf = reference(*PAIR)
    hf.save_pretrained(tmp_path)
    ours = SpeechSeq2Seq.from_pretrained(tmp_path)
    head = ctc.init_head(ours.config, seed=0)
    batch = ctc_batch()
    step = StepConfig(dropout=False, ctc_weight=WEIGHT)
    loss, tokens, grads = jax.jit(lambda p, b: loss_and_grad(ours.config, step, p, {}, b))(
        {**ours.params, **head}, batch)
    assert int(tokens) == 20

    def run(model):
        model.zero_grad()
        objective, w = torch_objective(model, head[ctc.HEAD], batch)
        objective.backward()
        named = {n: np.zeros(p.shape) if p.grad is None else p.grad.double().numpy() for n, p in
                 model.named_parameters()}
        named.update({f"ctc.{k}": v.grad.double().numpy() for k, v in w.items()})
        return objective.item(), named

    want_loss, want = run(hf)
    _, exact = run(reference(*PAIR, double=True))
    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
    got = hf_named(ours.config, ctc.model_params(grads))
    got.update({f"ctc.{k}": np.asarray(v) for k, v in grads[ctc.HEAD].items()})
    assert sorted(got) == sorted(want)
    # CTC's forward-backward over 79 frames in float32 drifts further from the float64 result than the attention
    # loss does (torch's own fp32 gradients are up to ~1e-4 of a tensor's largest off): each tensor is held to
    # float64's within 1e-5 of its largest gradient or within the error torch's fp32 run itself has
    worst, scale = {}, max(np.abs(e).max() for e in exact.values())
    for name, g in got.items():
        top = np.abs(exact[name]).max()
        allowed = max(GRAD_RTOL * top, FLOOR_FACTOR * np.abs(want[name] - exact[name]).max())
        worst[name] = np.abs(g - exact[name]).max() / max(top, 1e-3 * scale)  # key biases: exactly 0
        assert np.abs(g - exact[name]).max() <= allowed, (name, np.abs(g - exact[name]).max(), allowed, top)
    assert max(worst.values()) < 1e-4, max(worst.items(), key=lambda kv: kv[1])
    # the CTC term is really in there: without it the objective is transformers' own loss
    plain, _, _ = loss_and_grad(ours.config, StepConfig(dropout=False), ours.params, {}, batch)
    assert abs(float(plain) - float(loss)) > 1e-3


def tiny_config():
    return seq2seq_config_from_hf(F.any_seq2seq(*PAIR).config.to_dict())


def test_infeasible_rows_add_nothing():
    """A row with more text tokens than frames has no CTC alignment: it adds 0 (``zero_infinity``), not 1e5."""
    model_cfg = tiny_config()
    head = ctc.init_head(model_cfg, seed=1)[ctc.HEAD]
    frames = jax.random.normal(jax.random.PRNGKey(0), (2, 4, model_cfg.decoder.hidden_size))
    labels = np.array([[5, 6, 7, 8, 9, 2], [5, 6, 2, -100, -100, -100]], np.int32)
    padding = np.full((1, 6), -100, np.int32)  # a loader's padding row
    assert float(ctc.ctc_loss_sum(model_cfg, head, frames[:1], None, padding)) == 0.0
    both = float(ctc.ctc_loss_sum(model_cfg, head, frames, None, labels))
    second = float(ctc.ctc_loss_sum(model_cfg, head, frames[1:], None, labels[1:]))
    assert 0 < second < 100 and both == pytest.approx(second, rel=1e-6)
    # repeats need a blank between them: "5 5 5" needs 5 frames, so 4 frames cannot align it
    repeated = np.array([[5, 5, 5, 2]], np.int32)
    assert float(ctc.ctc_loss_sum(model_cfg, head, frames[:1], None, repeated)) == 0.0


def test_head_decay_and_bad_settings():
    model_cfg = tiny_config()
    head = ctc.init_head(model_cfg, seed=0)
    assert decay_mask(model_cfg)(head) == {"ctc": {"kernel": True, "bias": False}}  # a Linear, as the Trainer does
    with pytest.raises(ConfigError, match="step.ctc_weight"):
        StepConfig(ctc_weight=1.5)
    with pytest.raises(ConfigError, match="no CTC head"):
        loss_and_grad(model_cfg, StepConfig(ctc_weight=0.5), {}, {}, ctc_batch())
