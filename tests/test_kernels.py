"""The CPU kernel for the decode step's weight dots (``speechseq.kernels``): its products against numpy's, the
panel layout, and what happens where it cannot be built. Its use inside ``generate`` is checked against transformers
in test_generate.py (``native`` fixture: with the kernel and with XLA's dots)."""

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

    from speechseq.layers.core import dense, out_major

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
