"""``layers.core.attention`` against a float64 NumPy softmax attention, for each key layout and for one query row,
which the decode step on CPU computes as multiply-and-reduce rather than dots; masks of every rank the callers pass,
and a fully masked row (uniform, as in transformers)."""

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


@pytest.mark.parametrize("rows", [1, T])
@pytest.mark.parametrize("layout", ["bsnh", "bnsh", "bnhs"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_attention_matches_softmax_reference(layout, rows, mask_name):
    import jax.numpy as jnp

    from speechseq.layers.core import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, rows, N, H), (B, S, N, H), (B, S, N, H)))
    mask = MASKS[mask_name]
    if mask is not None:
        mask = mask[..., :rows, :].copy()
        if "fully masked" in mask_name:
            mask[..., 0, :] = False
    want = reference(q, k, v, mask, 0.3)
    kk, vv = {"bsnh": (k, v), "bnsh": (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)),
              "bnhs": (k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3))}[layout]
    got = attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(vv), None if mask is None else jnp.asarray(mask),
                    0.3, layout)
    assert got.shape == (B, rows, N, H)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
