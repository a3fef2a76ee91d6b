"""The one linear layer: dense or NF4 base weight, plus an optional LoRA/DoRA adapter.

The base weight is read with ``self.variable('params', 'kernel', ...)`` so that the stored value
is used as it is: a dense ``[in, out]`` array, or an ``NF4Weight`` holding the PyTorch-layout
``[out, in]`` matrix quantized as bitsandbytes does (SPECS.md section 1). NF4 is a storage format:
the weight is dequantized to the compute dtype inside the jitted computation, never stored
dequantized: the LoRA path keeps the NF4 weight as its residual and dequantizes it again in the
backward pass, as bitsandbytes' ``MatMul4Bit`` does. The LoRA path is added when the ``'lora'``
collection has an ``adapter`` entry for this layer (see ``jaxft.nn.lora.LoraWeights``).

Activations are 2-D, ``[n, in]`` with ``n`` = batch x time: the LoRA factor gradients are then
plain matrix products of 2-D arrays, with no transposed copy of a 3-D activation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Float, Int

from jaxft.nn.head import head_logprobs, token_logprobs
from jaxft.nn.lora import LoraWeights, dora_row_norm
from jaxft.nn.norm import Normed, normed_value
from jaxft.quant.nf4 import NF4Weight, nf4_dequantize

Initializer = Callable[..., Array]


def base_kernel(kernel: Array | NF4Weight, dtype: jnp.dtype) -> Float[Array, "i o"]:
    """The base weight in JAX layout ``[in, out]`` and the compute dtype (dequantized if NF4)."""
    if isinstance(kernel, NF4Weight):
        return nf4_dequantize(kernel, dtype).T
    return kernel.astype(dtype)


def _contract(x: Array, y: Array, dims: tuple[int, int]) -> Array:
    return jax.lax.dot_general(x, y, (((dims[0],), (dims[1],)), ((), ())))


def _matmul(x2: Float[Array, "n i"], kernel: Array | NF4Weight, dtype: jnp.dtype) -> Array:
    """``x W``; an NF4 weight is used in its ``[out, in]`` layout, never transposed."""
    if isinstance(kernel, NF4Weight):
        return _nf4_matmul(x2, kernel, dtype)
    return jnp.dot(x2, kernel.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nf4_matmul(x2: Array, kernel: NF4Weight, dtype: jnp.dtype) -> Array:
    """``x W`` with a frozen NF4 weight whose backward dequantizes it again, so that the
    dequantized weight is never kept between the passes (autodiff would keep it)."""
    return _contract(x2, nf4_dequantize(kernel, dtype), (1, 1))


def _nf4_matmul_fwd(x2: Array, kernel: NF4Weight, dtype: jnp.dtype) -> tuple[Array, NF4Weight]:
    return _nf4_matmul(x2, kernel, dtype), kernel


def _nf4_matmul_bwd(dtype: jnp.dtype, kernel: NF4Weight, dy: Array) -> tuple[Array, None]:
    return jnp.dot(dy, nf4_dequantize(kernel, dtype)), None


_nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)


def _matmul_t(dy: Float[Array, "n o"], kernel: Array | NF4Weight, dtype: jnp.dtype) -> Array:
    """``dy W^T``, the input gradient of ``_matmul``."""
    if isinstance(kernel, NF4Weight):
        return _nf4_matmul_bwd(dtype, kernel, dy)[0]
    return _contract(dy, kernel.astype(dtype), (1, 1))


@jax.custom_vjp
def swiglu(gate: Float[Array, "n f"], up: Float[Array, "n f"]) -> Float[Array, "n f"]:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward pass (autodiff would
    also keep ``sigmoid(gate)`` and ``silu(gate)``: two more activations of the widest layer)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: Array, up: Array) -> tuple[Array, tuple[Array, Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res: tuple[Array, Array], dh: Array) -> tuple[Array, Array]:
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    d_gate = dh * up * sig * (1 + gate * (1 - sig))  # silu'(x) = s(x) (1 + x (1 - s(x)))
    return d_gate, dh * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)

LinearInput = Float[Array, "n i"] | tuple[Float[Array, "n i"], Float[Array, "n i"]] | Normed


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def lora_matmul(
    x: LinearInput,
    xd: Float[Array, "n i"] | None,
    kernel: Array | NF4Weight,
    a: Float[Array, "i r"],
    b: Float[Array, "r o"],
    scaling: float,
    dtype: jnp.dtype,
) -> Float[Array, "n o"]:
    """``h W + s (hd A) B``: PEFT's LoRA forward. ``h = x``, ``h = swiglu(gate, up)`` when
    ``x`` is the pair ``(gate, up)``, or RMSNorm's output when ``x`` is a ``Normed``; ``hd = xd``
    (the dropped-out input) when given, else ``h``.

    The custom VJP saves ``x`` (or ``xd``), ``(hd A)^T`` and the weights (an NF4 weight stays
    quantized); a SwiGLU input is recomputed from ``gate`` and ``up``, which its own backward needs
    anyway, and a normalised input from the norm's input and statistics. Every product is arranged so that the CPU matmul library takes it as it is
    (``_lora_bwd``). The base weight's gradient is computed only when it is differentiated.
    """
    return _lora_apply(x, xd, kernel, a, b, scaling, dtype)[0]


def _layer_input(x: LinearInput) -> Array:
    if isinstance(x, Normed):
        return x.value()
    return jax.nn.silu(x[0]) * x[1] if isinstance(x, tuple) else x


def _lora_apply(x, xd, kernel, a, b, scaling, dtype, train_kernel=False):
    h = _layer_input(x)
    xa = jnp.dot(h if xd is None else xd, a)  # [n, r]
    y = _matmul(h, kernel, dtype) + jnp.asarray(scaling, dtype) * jnp.dot(xa, b)
    saved_x = x if xd is None or isinstance(x, tuple) or train_kernel else None
    # Residuals are pytrees: an empty tuple marks a trained base weight, ``None`` a frozen one.
    return y, (saved_x, xd, jnp.swapaxes(xa, 0, 1), kernel, a, b, () if train_kernel else None)


def _lora_fwd(x, xd, kernel, a, b, scaling, dtype):
    perturbed = any(p.perturbed for p in jax.tree.leaves(kernel, is_leaf=_is_primal))
    x, xd, kernel, a, b = jax.tree.map(lambda p: p.value, (x, xd, kernel, a, b), is_leaf=_is_primal)
    train_kernel = perturbed and not isinstance(kernel, NF4Weight)  # NF4 codes are not trained
    return _lora_apply(x, xd, kernel, a, b, scaling, dtype, train_kernel)


def _is_primal(p: object) -> bool:
    return isinstance(p, CustomVJPPrimal)


def _lora_bwd(scaling, dtype, res, dy):
    x, xd, xa_t, kernel, a, b, train_kernel = res
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros(dy.shape, dy.dtype)
    s = jnp.asarray(scaling, dtype)
    h = None if x is None else _layer_input(x)
    hd = h if xd is None else xd
    # Every dot contracts the last axis of its left operand. (dy B^T)^T is computed directly as
    # B dy^T, and the [r, in] product is transposed after an optimization barrier, which keeps XLA
    # from folding the transpose back into a dot over the long axis of hd (a slow fallback path).
    g = _contract(dy, b, (1, 1)) * s  # [n, r]
    g_t = _contract(b, dy, (1, 1)) * s  # [r, n]
    da = jnp.swapaxes(jax.lax.optimization_barrier(jnp.dot(g_t, hd)), 0, 1)  # [in, r]
    db = jnp.dot(xa_t, dy) * s  # [r, out]
    dh = _matmul_t(dy, kernel, dtype)
    dhd = _contract(g, a, (1, 1))  # [n, in]
    dkernel = None if train_kernel is None else _contract(h, dy, (0, 0)).astype(kernel.dtype)
    if xd is None:
        dh, dhd = dh + dhd, None
    if isinstance(x, Normed):  # through RMSNorm's scaling: to x, rstd and the norm weight
        dx = Normed(*jax.vjp(normed_value, *x)[1](dh))
    else:
        dx = _swiglu_bwd(x, dh) if isinstance(x, tuple) else dh
    return dx, dhd, dkernel, da, db


lora_matmul.defvjp(_lora_fwd, _lora_bwd, symbolic_zeros=True)


class Linear(nn.Module):
    """``y = x W + b`` (+ LoRA). Parameters: ``kernel`` ``[in, out]`` or NF4, ``bias`` ``[out]``."""

    features: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "... i"],
        deterministic: bool = True,
        gate: Float[Array, "... i"] | None = None,
        targets: Int[Array, "..."] | None = None,
    ) -> Array | tuple[Array, Array]:
        """``x W (+ b)``; with ``gate``, the input is ``swiglu(gate, x)`` (the MLP's down
        projection), computed inside the layer so that only ``gate`` and ``x`` are kept.

        With ``targets`` (an output layer), returns ``token_logprobs(x W (+ b), targets)``:
        ``(log p(target), logsumexp)`` in fp32, shaped like ``targets``. A dense layer without
        bias or adapter computes them with ``head_logprobs``, never forming the logits."""
        if isinstance(x, Normed) and (
            gate is not None or targets is not None or x.x.dtype != jnp.dtype(self.dtype)
            or not self.has_variable("lora", "adapter")
        ):
            x = x.value()  # only the LoRA path (``_with_lora``) takes the norm's parts
        in_features = x.shape[-1]
        kernel = self.variable(
            "params",
            "kernel",
            lambda: self.kernel_init(
                self.make_rng("params"), (in_features, self.features), self.param_dtype
            ),
        ).value
        lead = x.shape[:-1]
        if isinstance(x, Normed):  # for lora_matmul, which recomputes the norm in its backward
            x2 = Normed(x.x.reshape(-1, in_features), x.rstd.reshape(-1, 1), x.weight)
        else:
            x2 = x.reshape(-1, in_features).astype(self.dtype)  # 2-D activations: [B*T, in]
        gate2 = None if gate is None else gate.reshape(-1, in_features).astype(self.dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        has_adapter = self.has_variable("lora", "adapter")
        if targets is not None and gate is None and bias is None and not has_adapter and not (
            isinstance(kernel, NF4Weight)
        ):
            t = targets.reshape(-1)
            logp, lse = head_logprobs(x2, kernel.astype(self.dtype), t)
            return logp.reshape(targets.shape), lse.reshape(targets.shape)
        if has_adapter:
            adapter: LoraWeights = self.get_variable("lora", "adapter")
            y = self._with_lora(x2, gate2, kernel, adapter, deterministic)
        else:
            y = _matmul(x2 if gate2 is None else swiglu(gate2, x2), kernel, self.dtype)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        if targets is not None:
            logp, lse = token_logprobs(y, targets.reshape(-1))
            return logp.reshape(targets.shape), lse.reshape(targets.shape)
        return y.reshape(*lead, self.features)

    def _with_lora(
        self,
        x2: Array | Normed,
        gate2: Array | None,
        kernel: Array | NF4Weight,
        adapter: LoraWeights,
        deterministic: bool,
    ) -> Array:
        """PEFT's forward: ``y + s * drop(x) A B``; DoRA rescales rows by ``m / ||W + sBA||``."""
        dropout = adapter.dropout > 0.0 and not deterministic
        if gate2 is not None and (dropout or adapter.m is not None):
            x2, gate2 = swiglu(gate2, x2), None  # these paths take the SwiGLU output as input
        if isinstance(x2, Normed) and (dropout or adapter.m is not None):
            x2 = x2.value()  # and the normalised input
        xd = nn.Dropout(rate=adapter.dropout, deterministic=False)(x2) if dropout else None
        a = adapter.a.astype(self.dtype)
        b = adapter.b.astype(self.dtype)
        if adapter.m is None:
            inputs = x2 if gate2 is None else (gate2, x2)
            return lora_matmul(inputs, xd, kernel, a, b, adapter.scaling, jnp.dtype(self.dtype))
        xd = x2 if xd is None else xd
        y_base = _matmul(x2, kernel, self.dtype)
        lora = jnp.dot(jnp.dot(xd, a), b) * jnp.asarray(adapter.scaling, self.dtype)
        w = base_kernel(kernel, self.dtype)
        scale = (adapter.m.astype(self.dtype) / dora_row_norm(w, adapter))[None, :]
        # PEFT (DoraLinearVariant): base output of the dropped-out input when dropout is active.
        y_drop = y_base if xd is x2 else jnp.dot(xd, w)
        return y_base + (scale - 1) * y_drop + scale * lora
