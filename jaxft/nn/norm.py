"""RMSNorm with Hugging Face Llama numerics.

Reference: transformers/models/llama/modeling_llama.py ``LlamaRMSNorm``: normalise in fp32, cast
back to the input dtype, then multiply by the weight.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def rms_stats(x: Float[Array, "... d"], eps: float) -> Float[Array, "... 1"]:
    """``1 / sqrt(mean(x^2) + eps)`` per row, in fp32."""
    x32 = x.astype(jnp.float32)
    # x * x rather than square(x): the derivative then needs x itself (already kept for the
    # backward pass), not a scaled copy 2x that autodiff would keep as one more activation.
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def normed_value(x: Array, rstd: Array, weight: Array) -> Array:
    """``weight * (x * rstd).astype(x.dtype)``: HF's order of casts."""
    return weight.astype(x.dtype) * (x.astype(jnp.float32) * rstd).astype(x.dtype)


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float) -> Array:
    """``weight * (x / sqrt(mean(x^2) + eps)).astype(x.dtype)`` with the statistics in fp32."""
    return normed_value(x, rms_stats(x, eps), weight)


class Normed(NamedTuple):
    """An RMSNorm output kept as its parts ``(x, rstd, weight)``: a layer that takes it (the LoRA
    path of ``Linear``) recomputes the normalised input in its backward pass from ``x``, which
    the residual stream keeps anyway, instead of keeping a normalised copy of every layer input."""

    x: Array
    rstd: Array
    weight: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    def value(self) -> Array:
        return normed_value(self.x, self.rstd, self.weight)


class RMSNorm(nn.Module):
    """Linen RMSNorm; the parameter is ``scale`` (HF ``weight``), initialised to ones."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"], parts: bool = False) -> Array | Normed:
        """The normalised ``x``; with ``parts``, a ``Normed`` for the layers that take one."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        normed = Normed(x, rms_stats(x, self.eps), scale)
        return normed if parts else normed.value()
