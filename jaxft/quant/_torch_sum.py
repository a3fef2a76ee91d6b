"""The fp32 summation order of ``torch.sum`` on the CPU, in jnp.

Double quantization subtracts ``offset = absmax.mean()`` from the block scales. PyTorch computes
that mean as ``sum / n`` with a cascade sum (aten/src/ATen/native/cpu/SumKernel.cpp,
``cascade_sum``) whose fp32 result depends on the order of the additions: a correctly rounded
mean differs from torch's in about a third of the cases. To give bitsandbytes' offset bit for bit,
this module replays that order with explicit left-to-right additions (XLA does not reassociate
floating-point adds).

The order replayed is torch's serial path with 8-lane vectors (the ``Vectorized<float>`` width of
x86 AVX2 builds; torch also uses it for sums on AVX-512 machines). Torch splits inputs of 32768 or
more elements over its threads, which changes the order again; for such inputs the offset matches
torch run with one thread and may differ from a multi-threaded run by an ulp.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

_VEC_LANES = 8  # Vectorized<float>::size()
_ILP = 4  # row_sum's ilp_factor
_LEVELS = 4  # multi_row_sum's num_levels


def _ceil_log2(x: int) -> int:
    return max(0, (x - 1).bit_length())


def _seq_sum(x: Array, axis: int) -> Array:
    """Left-to-right sum along ``axis`` (zeros when the axis is empty)."""
    x = jnp.moveaxis(x, axis, 0)
    total = jnp.zeros(x.shape[1:], x.dtype)
    for k in range(x.shape[0]):
        total = total + x[k]
    return total


def _multi_row_sum(rows: Float[Array, "size lanes"]) -> Float[Array, " lanes"]:
    """``multi_row_sum``: running sums in chunks of ``step`` rows, cascaded over 4 levels.

    Level 0 sums ``step`` rows at a time; each chunk sum is added to level 1, which is flushed
    into level 2 every ``step`` chunks, which is flushed into level 3 every ``step**2`` chunks.
    Rows past the last whole chunk are summed into level 0; the result is
    ``((acc0 + acc1) + acc2) + acc3``.
    """
    size, lanes = rows.shape
    step = 1 << max(4, _ceil_log2(size) // _LEVELS)
    g0 = size // step
    chunks = _seq_sum(rows[: g0 * step].reshape(g0, step, lanes), axis=1)  # [g0, lanes]
    g1 = g0 // step
    runs1 = _seq_sum(chunks[: g1 * step].reshape(g1, step, lanes), axis=1)  # [g1, lanes]
    acc1 = _seq_sum(chunks[g1 * step :], axis=0)
    g2 = g1 // step
    runs2 = _seq_sum(runs1[: g2 * step].reshape(g2, step, lanes), axis=1)  # [g2, lanes]
    acc2 = _seq_sum(runs1[g2 * step :], axis=0)
    acc3 = _seq_sum(runs2, axis=0)
    acc0 = _seq_sum(rows[g0 * step :], axis=0)
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(vecs: Float[Array, "size lanes"]) -> Float[Array, " lanes"]:
    """``row_sum``: 4 interleaved accumulators over ``vecs``, then combined in order."""
    size, lanes = vecs.shape
    n_ilp = size // _ILP
    partial = _multi_row_sum(vecs[: n_ilp * _ILP].reshape(n_ilp, _ILP * lanes))
    partial = partial.reshape(_ILP, lanes)
    acc = partial[0]
    for k in range(n_ilp * _ILP, size):
        acc = acc + vecs[k]
    for k in range(1, _ILP):
        acc = acc + partial[k]
    return acc


def torch_cpu_sum_f32(x: Float[Array, " n"]) -> Float[Array, ""]:
    """``torch.sum(x)`` of a contiguous fp32 vector on the CPU (one thread), bit for bit.

    Inputs of at least 8 elements take ``vectorized_inner_sum``: 8-lane vectors through
    ``row_sum``, then the scalar tail, then the 8 lanes, each added left to right. Shorter inputs
    run ``row_sum`` on scalars.
    """
    (n,) = x.shape
    x = x.astype(jnp.float32)
    lanes = _VEC_LANES if n >= _VEC_LANES else 1
    n_vec = n // lanes
    lane_sums = _row_sum(x[: n_vec * lanes].reshape(n_vec, lanes))
    total = jnp.zeros((), jnp.float32)
    for k in range(n_vec * lanes, n):
        total = total + x[k]
    for k in range(lanes):
        total = total + lane_sums[k]
    return total


def ieee_divide(x: Float[Array, "*s"], d: Float[Array, ""]) -> Float[Array, "*s"]:
    """``x / d`` rounded once, as an IEEE division (on backends whose division is IEEE).

    XLA's simplifier rewrites a division by a constant or by a broadcast scalar (which is what a
    scalar divisor becomes under ``jax.vmap``) into a multiplication by the reciprocal, which
    rounds twice. A divisor that depends on ``x`` (equal to ``d`` except where ``x`` is NaN, where
    the quotient is NaN either way) is neither, so the division stays.
    """
    return x / jnp.where(jnp.isnan(x), x, d)


def torch_cpu_mean_f32(x: Float[Array, " n"]) -> Float[Array, ""]:
    """``torch.mean(x)`` of an fp32 vector on the CPU: the cascade sum divided by ``n`` in fp32."""
    return ieee_divide(torch_cpu_sum_f32(x), jnp.float32(x.shape[0]))
