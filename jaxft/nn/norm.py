"""RMSNorm with Hugging Face Llama numerics.

Reference: transformers/models/llama/modeling_llama.py ``LlamaRMSNorm``: normalise in fp32, cast
back to the input dtype, then multiply by the weight.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float) -> Array:
    """``weight * (x / sqrt(mean(x^2) + eps)).astype(x.dtype)`` with the statistics in fp32."""
    x32 = x.astype(jnp.float32)
    # x * x rather than square(x): the derivative then needs x itself (already kept for the
    # backward pass), not a scaled copy 2x that autodiff would keep as one more activation.
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * y


class RMSNorm(nn.Module):
    """Linen RMSNorm; the parameter is ``scale`` (HF ``weight``), initialised to ones."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps)
