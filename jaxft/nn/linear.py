"""The one linear layer: dense or NF4 base weight, plus an optional LoRA/DoRA adapter.

The base weight is read with ``self.variable('params', 'kernel', ...)`` so that the stored value
is used as it is: a dense ``[in, out]`` array, or an ``NF4Weight`` holding the PyTorch-layout
``[out, in]`` matrix quantized as bitsandbytes does (SPECS.md section 1). NF4 is a storage format:
the weight is dequantized to the compute dtype inside the jitted computation, never stored
dequantized. The LoRA path is added when the ``'lora'`` collection has an ``adapter`` entry for
this layer (see ``jaxft.nn.lora.LoraWeights``).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxft.nn.lora import LoraWeights, dora_row_norm
from jaxft.quant.nf4 import NF4Weight, nf4_dequantize

Initializer = Callable[..., Array]


def base_kernel(kernel: Array | NF4Weight, dtype: jnp.dtype) -> Float[Array, "i o"]:
    """The base weight in JAX layout ``[in, out]`` and the compute dtype (dequantized if NF4)."""
    if isinstance(kernel, NF4Weight):
        return nf4_dequantize(kernel, dtype).T
    return kernel.astype(dtype)


def _matmul(x2: Float[Array, "n i"], kernel: Array | NF4Weight, dtype: jnp.dtype) -> Array:
    if isinstance(kernel, NF4Weight):
        w_oi = nf4_dequantize(kernel, dtype)  # [out, in], bitsandbytes layout
        return jax.lax.dot_general(x2, w_oi, (((1,), (1,)), ((), ())))
    return jnp.dot(x2, kernel.astype(dtype))


class Linear(nn.Module):
    """``y = x W + b`` (+ LoRA). Parameters: ``kernel`` ``[in, out]`` or NF4, ``bias`` ``[out]``."""

    features: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: Float[Array, "... i"], deterministic: bool = True) -> Array:
        in_features = x.shape[-1]
        kernel = self.variable(
            "params",
            "kernel",
            lambda: self.kernel_init(
                self.make_rng("params"), (in_features, self.features), self.param_dtype
            ),
        ).value
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features).astype(self.dtype)  # 2-D activations: [B*T, in]
        y = _matmul(x2, kernel, self.dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        if self.has_variable("lora", "adapter"):
            adapter: LoraWeights = self.get_variable("lora", "adapter")
            y = self._add_lora(x2, y, kernel, adapter, deterministic)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y.reshape(*lead, self.features)

    def _add_lora(
        self,
        x2: Array,
        y_base: Array,
        kernel: Array | NF4Weight,
        adapter: LoraWeights,
        deterministic: bool,
    ) -> Array:
        """PEFT's forward: ``y + s * drop(x) A B``; DoRA rescales rows by ``m / ||W + sBA||``."""
        xd = x2
        if adapter.dropout > 0.0 and not deterministic:
            xd = nn.Dropout(rate=adapter.dropout, deterministic=False)(x2)
        a = adapter.a.astype(self.dtype)
        b = adapter.b.astype(self.dtype)
        lora = jnp.dot(jnp.dot(xd, a), b) * jnp.asarray(adapter.scaling, self.dtype)
        if adapter.m is None:
            return y_base + lora
        w = base_kernel(kernel, self.dtype)
        scale = (adapter.m.astype(self.dtype) / dora_row_norm(w, adapter))[None, :]
        # PEFT (DoraLinearVariant): base output of the dropped-out input when dropout is active.
        y_drop = y_base if xd is x2 else jnp.dot(xd, w)
        return y_base + (scale - 1) * y_drop + scale * lora
