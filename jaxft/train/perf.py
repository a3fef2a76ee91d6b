"""Throughput accounting: FLOPs per trained token and the devices' peak rate, for MFU.

FLOPs per token follow shared/bench/WORKLOAD.md: a frozen base costs forward + activation
gradients (4 x its matmul parameters), trained parameters forward + both gradients (6 x), and
attention ``12 * L * S * d`` (full S x S scores, the causal mask not discounted).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxft._host import release_free_memory
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
    return matmul_rate()


def matmul_rate(n: int = 1024, reps: int = 3) -> float:
    """Best fp32 FLOP/s of a jitted ``n x n`` by ``n x n`` ``jnp.dot`` on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


class CompiledOnFirstCall:
    """A ``jax.jit`` function compiled ahead of its first run, with the compiler's scratch
    memory returned to the OS (``release_free_memory``) before the executable allocates its
    workspace. A call whose arguments differ in structure, shape or dtype from the first call's
    goes to the jitted function (compiled again, with a warning the first time); a sharding
    mismatch raises, as it does for any compiled executable."""

    def __init__(self, jitted: Any) -> None:
        self.jitted = jitted
        self.compiled: Callable[..., Any] | None = None
        self._warned = False

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            release_free_memory()
        try:
            return self.compiled(*args)
        except TypeError as e:  # the executable checks its arguments before running
            if not self._warned:
                warnings.warn(f"arguments differ from the first call's, compiling again: {e}",
                              stacklevel=2)
                self._warned = True
            return self.jitted(*args)
