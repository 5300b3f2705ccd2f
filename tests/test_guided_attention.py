"""The guided (diagonal) attention loss of the train step (``StepConfig.guided_attention``): its value is the
formula's over transformers' own cross-attention probabilities, and the loss and gradients with it equal
``backward()`` of that formula added to transformers' loss in PyTorch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from speechseq import SpeechSeq2Seq
from speechseq.errors import ConfigError
from speechseq.training import StepConfig
from speechseq.training.step import loss_and_grad, loss_sum
from test_training_step import assert_grads_match_torch, hf_named, padded_batch, reference

G, WIDTH, HEADS = 0.7, 0.3, 1
PAIR = ("w2v-group", "bart")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("guided")
    hf = reference(*PAIR)
    hf.save_pretrained(path)
    hf.set_attn_implementation("eager")  # transformers returns attention probabilities from its eager attention
    return hf, SpeechSeq2Seq.from_pretrained(path)


def torch_guided(hf, batch, width: float, heads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' loss (mean over label tokens) and the guided attention sum, written out in torch from the
    cross-attentions transformers returns: A the mean over layers and their first ``heads`` heads (0: all), N a row's
    label tokens, S its frames (the encoder's reduced attention mask)."""
    dtype = next(hf.parameters()).dtype
    mask = torch.from_numpy(batch["attention_mask"])
    out = hf(input_values=torch.from_numpy(batch["input_values"]).to(dtype), attention_mask=mask,
             labels=torch.from_numpy(batch["labels"]).long(), output_attentions=True)
    a = torch.stack([c[:, :heads] if heads else c for c in out.cross_attentions]).mean(dim=(0, 2))  # [B, T, S]
    frames = hf.encoder._get_feature_vector_attention_mask(a.shape[2], mask).sum(1).to(dtype)
    valid = torch.from_numpy(batch["labels"] != -100)
    tokens = valid.sum(1).to(dtype)
    guided = a.new_zeros(())
    for b in range(a.shape[0]):
        n = (torch.arange(a.shape[1], dtype=dtype) + 0.5) / tokens[b]
        s = (torch.arange(a.shape[2], dtype=dtype) + 0.5) / frames[b]
        w = 1 - torch.exp(-(n[:, None] - s[None, :]) ** 2 / (2 * width ** 2))
        guided = guided + (a[b] * w)[valid[b]].sum()
    return out.loss, guided


@pytest.mark.parametrize("heads", [0, 1])
def test_guided_attention_is_the_formula_over_transformers_attentions(model, heads):
    hf, ours = model
    batch = padded_batch()
    count = int((batch["labels"] != -100).sum())
    with torch.no_grad():
        ce, guided = torch_guided(hf, batch, WIDTH, heads)
        _, other = torch_guided(hf, batch, WIDTH, 2 if heads else 1)
    assert guided.item() > 0.05 * count  # a random model's attention is nowhere near the diagonal
    # the heads it covers matter, by more than the tolerance below (a random model attends almost evenly)
    assert abs(other.item() - guided.item()) > 3e-5 * guided.item()
    plain, n = loss_sum(ours.config, ours.params, batch, StepConfig())
    total, n2 = loss_sum(ours.config, ours.params, batch, StepConfig(guided_attention=G, guided_attention_width=WIDTH,
                                                                       guided_attention_heads=heads))
    assert int(n) == int(n2) == count
    assert abs(float(plain) / count - ce.item()) <= 1e-5 * ce.item()
    got = (float(total) - float(plain)) / G
    assert abs(got - guided.item()) <= 1e-5 * guided.item(), (got, guided.item())


def test_loss_and_grads_with_guided_attention_match_pytorch(model):
    hf, ours = model
    batch = padded_batch()
    count = int((batch["labels"] != -100).sum())
    step = StepConfig(dropout=False, guided_attention=G, guided_attention_width=WIDTH, guided_attention_heads=HEADS)
    loss, tokens, grads = jax.jit(lambda p, b: loss_and_grad(ours.config, step, p, {}, b))(ours.params, batch)

    def torch_grads(m):
        m.zero_grad()
        ce, guided = torch_guided(m, batch, WIDTH, HEADS)
        total = ce + G * guided / count
        total.backward()
        return total.item(), {k: np.zeros(p.shape) if p.grad is None else p.grad.double().numpy()
                              for k, p in m.named_parameters()}

    want_loss, want = torch_grads(hf)
    double = reference(*PAIR, double=True)  # the same weights (the factory is seeded) in float64
    double.set_attn_implementation("eager")
    _, exact = torch_grads(double)
    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss, (float(loss), want_loss)
    got = hf_named(ours.config, grads)
    # the key biases' true gradient is 0 (softmax ignores them): fp32 leaves noise there, small against the rest
    scale = max(np.abs(g).max() for g in want.values())
    zero = [k for k in got if np.abs(exact[k]).max() < 1e-12 * scale]
    assert all(np.abs(got[k]).max() < 1e-7 * scale for k in zero), zero
    assert_grads_match_torch({k: g for k, g in got.items() if k not in zero}, want, exact)


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="step.guided_attention"):
        StepConfig(guided_attention=-1)
    with pytest.raises(ConfigError, match="step.guided_attention_width"):
        StepConfig(guided_attention_width=0)
    with pytest.raises(ConfigError, match="step.guided_attention_heads"):
        StepConfig(guided_attention_heads=-1)
