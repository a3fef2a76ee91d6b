"""Throughput accounting: FLOPs per trained token and the devices' peak rate, for MFU.

FLOPs per token follow shared/bench/WORKLOAD.md: a frozen base costs forward + activation
gradients (4 x its matmul parameters), trained parameters forward + both gradients (6 x), and
attention ``12 * L * S * d`` (full S x S scores, the causal mask not discounted).
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.models.config import LlamaConfig

# Dense bf16 peak FLOP/s per chip (vendor figures).
_PEAK_BF16 = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "L4": 121e12, "B200": 2250e12,
}


def matmul_params(config: LlamaConfig) -> int:
    """Parameters in matmul weights (decoder linears + lm_head/tied embedding)."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attn + mlp) + c.vocab_size * c.hidden_size


def flops_per_token(config: LlamaConfig, trainable: Any, method: str, seq_len: int) -> float:
    n_mm = matmul_params(config)
    n_train = sum(int(x.size) for x in jax.tree.leaves(trainable))
    attention = 12 * config.num_layers * seq_len * config.num_heads * config.head_dim
    if method == "full":
        return 6.0 * n_mm + attention
    return 4.0 * n_mm + 6.0 * n_train + attention


@functools.cache
def peak_flops() -> float:
    """Sum over local devices of the peak FLOP/s; on CPU, a measured fp32 matmul rate."""
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        kind = getattr(dev, "device_kind", "")
        for name, rate in _PEAK_BF16.items():
            if name.lower() in kind.lower():
                return rate * jax.local_device_count()
        return 0.0
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def release_free_memory() -> str | None:
    """Return the host allocator's free pages to the OS; the allocator's name, or ``None``.

    XLA's compiler frees a few hundred MB of scratch that glibc malloc and tcmalloc keep mapped;
    a training step's workspace does not fit in those holes and is mapped on top, so the process
    would carry both for the whole run. tcmalloc (gperftools, when preloaded):
    ``MallocExtension_ReleaseFreeMemory``; glibc: ``malloc_trim(0)``.
    """
    libc = ctypes.CDLL(None)
    release = getattr(libc, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release()
        return "tcmalloc"
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
        return "glibc"
    return None


class CompiledOnFirstCall:
    """A ``jax.jit`` function compiled ahead of its first run, with the compiler's scratch
    memory returned to the OS (``release_free_memory``) before the executable allocates its
    workspace. Calls with other argument shapes or types go to the jitted function."""

    def __init__(self, jitted: Any) -> None:
        self.jitted = jitted
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            release_free_memory()
        try:
            return self.compiled(*args)
        except TypeError:  # other shapes or dtypes than the first call's: jit's own cache
            return self.jitted(*args)
