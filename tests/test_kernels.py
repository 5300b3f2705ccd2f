"""The CPU kernels of the decode step (``speechseq.kernels``): the weight dots' products and the attention against
numpy's, the panel layout, and what happens where they cannot be built. Their use inside ``generate`` is checked
against transformers in test_generate.py (``native`` fixture: with the kernels and with XLA's ops)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from speechseq import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=kernels.status())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 17])
@pytest.mark.parametrize("n, k", [(16, 16), (37, 50), (768, 768), (5, 3), (100, 3072)])
def test_panel_dot_matches_numpy(rows, n, k):
    import jax.numpy as jnp

    rng = np.random.default_rng(rows * 1000 + n + k)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    w_t = rng.standard_normal((n, k), dtype=np.float32)
    got = np.asarray(kernels.panel_dot(jnp.asarray(x), kernels.pack(jnp.asarray(w_t))))
    panels = -(-n // kernels.PANEL)
    assert got.shape == (rows, panels * kernels.PANEL)
    want = x.astype(np.float64) @ w_t.T.astype(np.float64)
    np.testing.assert_allclose(got[:, :n], want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.all(got[:, n:] == 0), "the padding's outputs are zeros"
    wp = kernels.pack(jnp.asarray(w_t))
    np.testing.assert_array_equal(np.asarray(kernels.panel_dot(jnp.asarray(x), wp, n)), got[:, :n])


def test_panel_dot_keeps_leading_axes_and_maps():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 40), dtype=np.float32)
    w_t = rng.standard_normal((32, 40), dtype=np.float32)
    wp = kernels.pack(jnp.asarray(w_t))
    want = x @ w_t.T
    np.testing.assert_allclose(np.asarray(jax.jit(kernels.panel_dot)(x, wp)), want, rtol=1e-5, atol=1e-5)
    mapped = jax.vmap(kernels.panel_dot, in_axes=(0, None))(jnp.asarray(x), wp)
    np.testing.assert_allclose(np.asarray(mapped), want, rtol=1e-5, atol=1e-5)


def test_pack_layout():
    """Panel p holds outputs 16p..16p+15 as [K, 16], zero-padded; the same in numpy (eager) and traced (in jit)."""
    import jax
    import jax.numpy as jnp

    w_t = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    wp = np.asarray(kernels.pack(jnp.asarray(w_t)))
    assert wp.shape == (2, 3, 16)
    for n in range(20):
        np.testing.assert_array_equal(wp[n // 16, :, n % 16], w_t[n])
    assert np.all(wp[1, :, 4:] == 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels.pack)(jnp.asarray(w_t))), wp)


def test_out_major_packs_only_what_dense_can_cut(monkeypatch):
    """``out_major`` packs a float32 kernel when a bias or a Dout of whole panels gives ``dense`` the width; other
    dtypes and widths keep the [Dout, Din] layout; ``dense`` gives the same numbers either way."""
    import jax.numpy as jnp

    from speechseq.decoding.cpu import dense, out_major

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 1, 24), dtype=np.float32))
    p = {"kernel": jnp.asarray(rng.standard_normal((24, 20), dtype=np.float32)),
         "bias": jnp.asarray(rng.standard_normal(20, dtype=np.float32))}
    want = np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    assert set(out_major(p, jnp.float32)) == {"kernel_p", "bias"}
    assert set(out_major({"kernel": p["kernel"]}, jnp.float32)) == {"kernel_t"}  # 20 outputs, no bias to cut to
    assert set(out_major({"kernel": p["kernel"][:, :16]}, jnp.float32)) == {"kernel_p"}
    assert set(out_major(p, jnp.bfloat16)) == {"kernel_t", "bias"}
    for q in (out_major(p, jnp.float32), {"kernel_t": p["kernel"].T, "bias": p["bias"]}):
        np.testing.assert_allclose(np.asarray(dense(q, x, jnp.float32)), want, rtol=1e-5, atol=1e-5)


def attention_f64(q, k, v, mask, scale):
    """float64 reference: q [B, T, N, H], k [B, N, H, S], v [B, N, S, H], mask [.., 1, T or 1, S] -> [B, T, N, H]."""
    scores = np.einsum("btnh,bnhs->bnts", q.astype(np.float64), k.astype(np.float64)) * scale
    if mask is not None:
        scores = np.where(mask, scores, np.finfo(np.float32).min)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bnsh->btnh", probs, v.astype(np.float64))


@pytest.mark.parametrize("B, T, N, H, S", [(1, 1, 1, 8, 7), (2, 1, 3, 64, 249), (2, 4, 2, 64, 132), (3, 3, 2, 20, 17),
                                           (1, 6, 2, 40, 16), (2, 17, 1, 130, 50), (1, 2, 2, 3, 1)])
@pytest.mark.parametrize("masking", ["none", "per utterance", "per row", "batch-wide", "a row fully masked"])
def test_attend_matches_numpy(B, T, N, H, S, masking):
    """Any number of query rows (register blocks of 4 and remainders), head sizes with and without whole 16-lane
    vectors, key counts with a partial last vector, each mask shape the decode step passes; a fully masked row is
    uniform over the keys, as in ``layers.core.attention`` and transformers."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(B * 1000 + T * 100 + H + S)
    q = rng.standard_normal((B, T, N, H), dtype=np.float32)
    k = rng.standard_normal((B, N, H, S), dtype=np.float32)
    v = rng.standard_normal((B, N, S, H), dtype=np.float32)
    mask = {"none": None, "per utterance": rng.random((B, 1, 1, S)) > 0.3, "per row": rng.random((B, 1, T, S)) > 0.4,
            "batch-wide": rng.random((1, 1, T, S)) > 0.4, "a row fully masked": rng.random((B, 1, T, S)) > 0.4}[masking]
    if masking == "a row fully masked":
        mask[-1, 0, -1] = False
    scale = np.float32(0.7)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None if mask is None else jnp.asarray(mask))
    assert kernels.attend_fits(*args)
    got = np.asarray(jax.jit(kernels.attend)(*args, jnp.float32(scale)))  # scale traced, as a layer's scale is
    want = attention_f64(q, k, v, mask, scale)
    assert got.shape == (B, T, N, H)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(v).max())
    if masking == "a row fully masked":
        np.testing.assert_allclose(got[-1, -1], v[-1].mean(1), rtol=0, atol=2e-6 * np.abs(v).max())


def test_attend_takes_only_what_it_computes_alike():
    """float32 q, k, v of rank 4 and a mask shared by the heads; other dtypes and per-head masks stay with XLA, and
    the CPU plan's attention (``decoding.cpu.attention``) gives the same numbers either way."""
    import jax.numpy as jnp

    from speechseq.decoding.cpu import attention

    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 4, 3, 16), dtype=np.float32))
    k = jnp.asarray(rng.standard_normal((2, 3, 16, 9), dtype=np.float32))
    v = jnp.asarray(rng.standard_normal((2, 3, 9, 16), dtype=np.float32))
    mask = jnp.asarray(rng.random((2, 1, 4, 9)) > 0.3)
    assert kernels.attend_fits(q, k, v, mask) and kernels.attend_fits(q, k, v, mask[0, 0])
    assert not kernels.attend_fits(q, k, v, jnp.broadcast_to(mask, (2, 3, 4, 9)))  # per head
    assert not kernels.attend_fits(q.astype(jnp.bfloat16), k, v, mask)
    got = attention(q, k, v, mask, 0.25)
    xla = attention(q, k, v, mask, 0.25, kernel=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=1e-5, atol=1e-6)


def test_built_once_then_loaded_from_the_cache():
    path = kernels._library_path()
    assert path.exists() and path.parent == kernels.cache_dir()
    before = path.stat().st_mtime_ns
    ok, why = kernels._load()
    assert ok and str(path) in why
    assert path.stat().st_mtime_ns == before


def test_without_a_compiler_xla_dots_are_used(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEECHSEQ_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a machine without a compiler is normal: no warning
        ok, why = kernels._load()
    assert not ok and "no C++ compiler" in why and "no-such-compiler-here" in why
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_warns_once_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEECHSEQ_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.warns(UserWarning, match="using XLA's dots") as caught:
        ok, why = kernels._load()
    assert not ok and "failed on few_row_dot.cc" in why
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert list(tmp_path.iterdir()) == [], "no half-written library is left behind"


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SPEECHSEQ_NATIVE", "0")
    assert kernels._load() == (False, "turned off by SPEECHSEQ_NATIVE=0")
