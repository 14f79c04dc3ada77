"""``kernels_cpu``: the native ``x @ w.T`` against a float64 numpy product over the row counts that pick each
register tile (1-7 rows left over, 4-row blocks), column counts that leave partial tiles and chunks, and K
that is not a multiple of 16; the shapes and dtypes it leaves to XLA; what a GPU lowering sees; and how the
library build fails over to XLA (kernels off, no compiler, a compiler without AVX-512)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_cpu

needs_native = pytest.mark.skipif(not kernels_cpu.native_available(),
                                  reason=f"native CPU kernels unavailable: {kernels_cpu.build.unavailable_reason()}")

_matmul = jax.jit(kernels_cpu.matmul_nt)


def _hlo(x, w) -> str:
    return jax.jit(kernels_cpu.matmul_nt).lower(x, w).as_text()


def _check(rows, n, k, seed=0, lead=()):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    y = np.asarray(_matmul(jnp.asarray(x), jnp.asarray(w)))
    truth = x.astype(np.float64) @ w.astype(np.float64).T
    assert y.shape == truth.shape and y.dtype == np.float32
    # float32 sums of k products: error grows like sqrt(k) * eps * |x||w|
    bound = 1e-6 * np.sqrt(max(k, 1)) * np.abs(x).max() * np.abs(w).max() * 4
    np.testing.assert_allclose(y, truth, rtol=0, atol=bound)
    return x, w


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 32, 64])
def test_matmul_matches_float64(rows):
    for n, k in ((5, 16), (97, 100), (50, 17), (1, 1)):
        _check(rows, n, k, seed=rows)
    assert "jserve_matmul_nt" in _hlo(jnp.zeros((rows, 8)), jnp.zeros((3, 8)))


@needs_native
def test_matmul_threaded_and_batched_shapes():
    """A product large enough to be shared between threads (many 48-row chunks, a partial last one), and
    leading batch axes."""
    _check(8, 4099, 576, seed=1)
    _check(3, 1000, 64, seed=2, lead=(2,))
    y = _matmul(jnp.ones((2, 0)), jnp.ones((5, 0)))  # K = 0: zeros, not garbage
    np.testing.assert_array_equal(np.asarray(y), 0.0)


@needs_native
def test_matmul_is_exact_on_integers():
    """Small integers multiply and add exactly in float32, so any misplaced tile or lane shows as a
    difference from numpy's exact integer product."""
    rng = np.random.default_rng(3)
    for rows, n, k in ((13, 70, 35), (32, 11, 64), (6, 48, 200)):
        x = rng.integers(-3, 4, (rows, k)).astype(np.float32)
        w = rng.integers(-3, 4, (n, k)).astype(np.float32)
        y = np.asarray(_matmul(jnp.asarray(x), jnp.asarray(w)))
        np.testing.assert_array_equal(y, x.astype(np.int64) @ w.astype(np.int64).T)


def test_what_runs_in_xla():
    """More than MAX_ROWS rows (prefill), bfloat16 operands, and a lowering for a GPU use XLA's dot."""
    w = jnp.asarray(np.random.default_rng(4).standard_normal((24, 40)), jnp.float32)
    x = jnp.ones((kernels_cpu.MAX_ROWS + 1, 40), jnp.float32)
    assert "jserve_matmul_nt" not in _hlo(x, w)
    np.testing.assert_allclose(np.asarray(_matmul(x, w)), np.asarray(x) @ np.asarray(w).T, rtol=1e-5, atol=1e-4)
    assert "jserve_matmul_nt" not in _hlo(x[:4].astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    exported = jax.export.export(jax.jit(kernels_cpu.matmul_nt), platforms=["cuda"])(x[:4], w)
    assert "jserve_matmul_nt" not in exported.mlir_module()
    with pytest.raises(ValueError, match="must be"):
        kernels_cpu.matmul_nt(jnp.ones((2, 3)), jnp.ones((4, 5)))


@needs_native
def test_grad_vmap_and_preferred_types_as_xlas_dot():
    """On the native path (<= MAX_ROWS float32 rows) ``grad`` raised (the FFI call had no derivative), ``vmap``
    raised NotImplementedError, and a bfloat16 preferred_element_type came back float32 (a TypeError under
    jit): each now gives what XLA's dot gives."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 4, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    xla = lambda a, b: jnp.einsum("...i,oi->...o", a, b, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    assert "jserve_matmul_nt" in _hlo(x[0], w)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for got, want in zip(jax.grad(loss(kernels_cpu.matmul_nt), (0, 1))(x[0], w), jax.grad(loss(xla), (0, 1))(x[0], w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(kernels_cpu.matmul_nt, (0, None)))(x, w)),
                               np.asarray(xla(x, w)), rtol=1e-5, atol=1e-4)
    for dtype in (jnp.bfloat16, jnp.float16):
        f = jax.jit(lambda a: kernels_cpu.matmul_nt(a, w, preferred_element_type=dtype))
        assert f(x[0]).dtype == dtype and "jserve_matmul_nt" not in f.lower(x[0]).as_text()


def _fresh_process(env_extra: dict, tmp_path) -> str:
    """Run a fresh interpreter (the library loads once per process) with its own empty kernel cache; prints
    whether the kernels loaded, why not, and a product's result."""
    code = textwrap.dedent("""
        import jax.numpy as jnp, numpy as np, kernels_cpu
        ok = kernels_cpu.native_available()
        y = kernels_cpu.matmul_nt(jnp.arange(6.0).reshape(2, 3), jnp.ones((4, 3)))
        print(ok, "|", kernels_cpu.build.unavailable_reason(), "|", np.asarray(y).tolist())
    """)
    env = {**os.environ, "JSERVE_CACHE_DIR": str(tmp_path), **env_extra}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_build_fails_over_to_xla(tmp_path):
    expect = "[[3.0, 3.0, 3.0, 3.0], [12.0, 12.0, 12.0, 12.0]]"
    out = _fresh_process({"JSERVE_CPU_KERNELS": "0"}, tmp_path / "off")
    assert out == f"False | turned off by JSERVE_CPU_KERNELS | {expect}"
    out = _fresh_process({"CXX": str(tmp_path / "no-such-compiler")}, tmp_path / "nocxx")
    assert out.startswith("False | could not build or load native.cc") and out.endswith(expect)
    # A compiler that targets a CPU without AVX-512: the source refuses to build, and says why.
    wrapper = tmp_path / "cxx-no-avx512"
    wrapper.write_text('#!/bin/sh\nexec g++ "$@" -mno-avx512f\n')
    wrapper.chmod(0o755)
    out = _fresh_process({"CXX": str(wrapper)}, tmp_path / "noavx")
    assert out.startswith("False | could not build or load native.cc") and "need AVX-512F" in out
    assert out.endswith(expect)
    # A compiler that exits 0 without writing a library: refused, and nothing is left in the cache that
    # every later process would fail to load (a 0-byte library used to stay there for good).
    out = _fresh_process({"CXX": "/bin/true"}, tmp_path / "true")
    assert out == f"False | could not build or load native.cc: /bin/true exited 0 but wrote no library | {expect}"
    assert not list((tmp_path / "true" / "kernels_cpu").glob("native-*"))


@needs_native
def test_build_caches_the_library(tmp_path):
    """The first process builds into the cache; a second loads that file (same name, untouched)."""
    out = _fresh_process({}, tmp_path)
    assert out.startswith("True | None")
    (lib,) = list((tmp_path / "kernels_cpu").glob("native-*.so"))
    mtime = lib.stat().st_mtime_ns
    assert _fresh_process({}, tmp_path).startswith("True | None")
    assert lib.stat().st_mtime_ns == mtime and not list((tmp_path / "kernels_cpu").glob("*.tmp"))
    lib.write_bytes(b"")  # a broken library in the cache: deleted and built again, once
    assert _fresh_process({}, tmp_path).startswith("True | None") and lib.stat().st_size > 0
    # CXX may carry arguments (a launcher such as ccache or env): it was run as one executable name
    cxx = kernels_cpu.build._compiler()
    assert _fresh_process({"CXX": f"env {cxx}"}, tmp_path / "env").startswith("True | None")
