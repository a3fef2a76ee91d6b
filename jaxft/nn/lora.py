"""The LoRA adapter of one linear layer, as a pytree that carries its own hyper-parameters.

An adapter lives in the ``'lora'`` variable collection at the path of the layer it adapts
(``lora/layers/self_attn/q_proj/adapter``). Its arrays are children (trained); its alpha,
rsLoRA flag and dropout rate are static aux data, so a tree of adapters is self-describing: the
forward pass, the merge and the PEFT export read the hyper-parameters from the tree itself.

Reference: peft/tuners/lora/layer.py (``Linear.forward``) and variants.py (``DoraLinearVariant``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float


@struct.dataclass
class LoraWeights:
    """LoRA factors of one linear layer (JAX layout).

    ``a``: ``[in, r]`` (= PEFT ``lora_A.weight.T``); ``b``: ``[r, out]`` (= ``lora_B.weight.T``);
    ``m``: ``[out]`` DoRA magnitude (``lora_magnitude_vector``) or ``None``.
    Stacked layers (``nn.scan``) add a leading layer axis to each array.
    """

    a: Float[Array, "... i r"]
    b: Float[Array, "... r o"]
    m: Float[Array, "... o"] | None = None
    alpha: float = struct.field(pytree_node=False, default=1.0)
    rslora: bool = struct.field(pytree_node=False, default=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT ``LoraLayer.update_layer``)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def use_dora(self) -> bool:
        return self.m is not None

    def delta(self) -> Float[Array, "... i o"]:
        """``scaling * A @ B`` in fp32, JAX layout ``[in, out]`` (PEFT's ``scaling * B @ A``, transposed)."""
        a = self.a.astype(jnp.float32)
        b = self.b.astype(jnp.float32)
        return self.scaling * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def dora_row_norm(w_io: Float[Array, "i o"], adapter: LoraWeights) -> Float[Array, " o"]:
    """``||W + s B A||`` per output row (PEFT ``get_weight_norm``), detached from the gradient.

    ``w_io`` is the base kernel in JAX layout ``[in, out]``; the norm runs over ``in``.
    """
    lora_w = adapter.scaling * jnp.matmul(
        adapter.a.astype(w_io.dtype), adapter.b.astype(w_io.dtype)
    )
    w = w_io + jax.lax.stop_gradient(lora_w)
    return jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
