"""The step wrapper that compiles ahead of the first run and hands the compiler's scratch back."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft._host import peak_rss_bytes, release_free_memory, rss_bytes
from jaxft.train import perf
from jaxft.train.perf import CompiledOnFirstCall


def test_release_free_memory_names_the_allocator():
    preloaded = "tcmalloc" in os.environ.get("LD_PRELOAD", "")
    assert release_free_memory() == ("tcmalloc" if preloaded else "glibc")


def test_peak_rss_is_this_process_not_its_parent(tmp_path):
    """A child of a large parent reports its own peak (``ru_maxrss`` would report the parent's)."""
    block = np.ones(200 * 2**20 // 8)  # this process: at least 200 MB resident
    assert peak_rss_bytes() >= block.nbytes and rss_bytes() >= block.nbytes
    code = "from jaxft._host import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    assert child < 100 * 2**20 < block.nbytes


def test_compiled_on_first_call(monkeypatch):
    released = []
    monkeypatch.setattr(perf, "release_free_memory", lambda: released.append(1) or "glibc")
    traces = []

    def f(x, y):
        traces.append(x.shape)
        return x * 2 + y, jnp.sum(x)

    step = CompiledOnFirstCall(jax.jit(f, donate_argnums=(0,)))
    a, b = jnp.arange(6.0), jnp.ones(6)
    out = step(a, b)
    np.testing.assert_array_equal(out[0], np.arange(6.0) * 2 + 1)
    assert released == [1] and step.compiled is not None
    for _ in range(3):  # the executable is reused: no retracing, no second release
        out = step(out[0], b)
    assert traces == [(6,)] and released == [1]
    np.testing.assert_array_equal(out[0], (np.arange(6.0) * 2 + 1) * 8 + 7)
    with pytest.warns(UserWarning, match="compiling again"):
        other = step(jnp.arange(4.0), jnp.ones(4))  # another shape goes to jit's own cache
    np.testing.assert_array_equal(other[0], np.arange(4.0) * 2 + 1)
    assert traces == [(6,), (4,)] and released == [1]
