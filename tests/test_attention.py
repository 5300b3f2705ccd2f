"""``layers.core.attention`` (the model's, head-major) and the CPU decode plan's (``decoding.cpu.attention``, which
computes one query row as multiply-and-reduce) against a float64 NumPy softmax attention: each key layout, grouped
query rows sharing one utterance's keys, masks of every rank the callers pass, and a fully masked row (uniform, as
in transformers)."""

import numpy as np
import pytest

B, T, N, H, S = 2, 3, 4, 8, 5


def reference(q, k, v, mask, scale):  # q [B, T, N, H], k and v [B, S, N, H], mask broadcastable to [B, N, T, S]
    scores = np.einsum("btnh,bsnh->bnts", q, k).astype(np.float64) * scale
    if mask is not None:
        scores = np.where(np.broadcast_to(mask, scores.shape), scores, np.finfo(np.float32).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


MASKS = {
    "none": None,
    "[B, 1, 1, S]": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None],
    "[B, N, T, S] with a fully masked row": np.random.default_rng(1).random((B, N, T, S)) > 0.4,
    "[T, S] causal": np.tril(np.ones((T, S), bool), 2),
}


def case(rows, mask_name):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, rows, N, H), (B, S, N, H), (B, S, N, H)))
    mask = MASKS[mask_name]
    if mask is not None:
        mask = mask[..., :rows, :].copy()
        if "fully masked" in mask_name:
            mask[..., 0, :] = False
    return q, k, v, mask


@pytest.mark.parametrize("rows", [1, T])
@pytest.mark.parametrize("layout", ["bnsh", "bnhs"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_attention_matches_softmax_reference(layout, rows, mask_name):
    import jax.numpy as jnp

    from speechseq.layers.core import attention

    q, k, v, mask = case(rows, mask_name)
    want = reference(q, k, v, mask, 0.3)
    kk = k.transpose(0, 2, 1, 3) if layout == "bnsh" else k.transpose(0, 2, 3, 1)
    got = attention(jnp.asarray(q.transpose(0, 2, 1, 3)), jnp.asarray(kk), jnp.asarray(v.transpose(0, 2, 1, 3)),
                    None if mask is None else jnp.asarray(mask), 0.3, layout)
    assert got.shape == (B, N, rows, H)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["bnsh", "bnhs"])
def test_grouped_rows_share_keys(layout):
    """``groups`` G: G consecutive query rows attend over one utterance's keys, each with its own mask row, equal to
    attending with the keys repeated per row."""
    import jax.numpy as jnp

    from speechseq.layers.core import attention

    G = 3
    rng = np.random.default_rng(2)
    q = rng.standard_normal((B * G, T, N, H)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, N, H)).astype(np.float32) for _ in range(2))
    mask = rng.random((B, G, 1, T, S)) > 0.3
    want = reference(q, np.repeat(k, G, 0), np.repeat(v, G, 0), mask.reshape(B * G, 1, T, S), 0.3)
    kk = k.transpose(0, 2, 1, 3) if layout == "bnsh" else k.transpose(0, 2, 3, 1)
    got = attention(jnp.asarray(q.transpose(0, 2, 1, 3)), jnp.asarray(kk), jnp.asarray(v.transpose(0, 2, 1, 3)),
                    jnp.asarray(mask), 0.3, layout, groups=G)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, T])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_cpu_plan_attention_matches_softmax_reference(rows, mask_name, native):
    """The CPU plan's attention (q [B, T, N, H], keys transposed): one query row by multiply-and-reduce, several by
    batched dots; with the C++ kernel where it runs and without."""
    import jax.numpy as jnp

    from speechseq.decoding.cpu import attention

    q, k, v, mask = case(rows, mask_name)
    want = reference(q, k, v, mask, 0.3)
    for kernel in (True, False):
        got = attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 3, 1)), jnp.asarray(v.transpose(0, 2, 1, 3)),
                        None if mask is None else jnp.asarray(mask), 0.3, kernel=kernel)
        assert got.shape == (B, rows, N, H)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
