"""The step wrapper that compiles ahead of the first run and hands the compiler's scratch back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.train import perf
from jaxft.train.perf import CompiledOnFirstCall, release_free_memory


def test_release_free_memory_names_the_allocator():
    # This process runs glibc malloc (no tcmalloc preloaded under pytest).
    assert release_free_memory() == "glibc"


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
    other = step(jnp.arange(4.0), jnp.ones(4))  # another shape goes to jit's own cache
    np.testing.assert_array_equal(other[0], np.arange(4.0) * 2 + 1)
    assert traces == [(6,), (4,)] and released == [1]
