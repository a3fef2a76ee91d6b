"""NF4 block quantization with double quantization, bit-compatible with bitsandbytes.

``nf4_quantize`` is a pure state transform (a weight array in, an ``NF4Weight`` out) and
``nf4_dequantize`` is what a quantized linear layer calls on every forward. Both are plain jnp,
traceable under ``jax.jit`` and ``jax.vmap``.

Numerics follow bitsandbytes 0.50 on the CPU (QLoRA, Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314):

- 4-bit: ``bitsandbytes/backends/default/ops.py`` (``quantize_4bit``, ``_dequantize_4bit_compute``).
  Blocks run over the row-major flattened weight; ``absmax`` is the fp32 max magnitude of the
  block's valid elements; whole blocks are scaled by multiplying with ``1 / absmax``, the trailing
  partial block by dividing by its absmax; values are clipped to [-1, 1] and take the nearest NF4
  code, a value exactly on a midpoint taking the lower one. Two codes per byte, the even-index
  element in the high nibble, an odd tail padded with code 7 (0.0).
- Double quantization: ``offset = absmax.mean()`` (with torch's CPU summation order, see
  ``_torch_sum``); ``absmax - offset`` is quantized in blocks of 256 to the signed 8-bit dynamic
  map by the LUT-based CPU kernel (``csrc/cpu_ops.cpp``, ``quantize_cpu_impl``): scale by
  ``1 / nested_absmax``, clip, look up ``trunc(((x + 1) * 0.5) * 65535 + 0.5)`` in a 65536-entry
  table; an all-zero block gets code 0.
- Dequantize: ``absmax = dynmap[q8] * nested_absmax + offset`` and ``w = nf4[q] * absmax``, all in
  fp32, then one cast.

Exactness holds on the CPU backend. Other backends run the same ops, but may round a division or
fuse a multiply-add differently, which can move a code or an ulp.

All-zero blocks: bitsandbytes' CPU path stores code 7, the CUDA path code 0, both 0.0 after
dequantization; here code 7. A trailing partial block that is all zeros stores absmax 0.0 here
and 1e-38 in bitsandbytes (its clamp); both dequantize to zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, UInt8

from jaxft.quant._maps import NF4_CODEBOOK, NF4_MIDPOINTS, dynamic_map, dynamic_quantize_lut
from jaxft.quant._torch_sum import ieee_divide, torch_cpu_mean_f32

NESTED_BLOCK_SIZE = 256  # bitsandbytes' block size for double quantization of absmax
VALID_BLOCK_SIZES = tuple(2**k for k in range(5, 13))  # 32 .. 4096
_LUT_SCALE = 65535.0


@struct.dataclass
class NF4Weight:
    """A weight matrix quantized to NF4, as a pytree.

    ``n = prod(shape)``, ``nblocks = ceil(n / block_size)``, ``nnested = ceil(nblocks / 256)``.
    Stacked weights (from ``jax.vmap(nf4_quantize)`` or ``nn.scan``) carry the same leading axes
    ``*L`` on every child; ``shape`` stays the shape of one matrix.

    Children:
        codes: uint8 ``[*L, ceil(n / 2)]``, two codes per byte, even element in the high nibble.
        absmax: uint8 ``[*L, nblocks]`` 8-bit codes of ``absmax - offset`` with double
            quantization; fp32 raw block absmax without.
        nested_absmax: fp32 ``[*L, nnested]``; ``[*L, 0]`` without double quantization.
        offset: fp32 ``[*L]``, the mean of the raw absmax (0.0 without double quantization).

    Static:
        shape: logical shape of one matrix, in the layout given (PyTorch ``[out, in]``).
        block_size: elements per block (a power of two in 32..4096).
        double_quant: whether ``absmax`` is itself quantized.
        dtype: name of the original dtype (``"bfloat16"``, ``"float32"``...), bitsandbytes'
            ``quant_state.dtype``.
    """

    codes: UInt8[Array, "*L half"]
    absmax: Array
    nested_absmax: Float[Array, "*L nnested"]
    offset: Float[Array, "*L"]
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False, default=64)
    double_quant: bool = struct.field(pytree_node=False, default=True)
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def numel(self) -> int:
        """Elements of one matrix."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Quantization blocks of one matrix."""
        return -(-self.numel // self.block_size)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading stacking axes (``()`` for a single matrix)."""
        return tuple(self.codes.shape[:-1])

    @property
    def nbytes(self) -> int:
        """Storage bytes of all children (works on ``jax.eval_shape`` outputs too)."""
        leaves = (self.codes, self.absmax, self.nested_absmax, self.offset)
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight: 4.127 with double quantization at block 64, 4.5 without."""
        return 8.0 * self.nbytes / (self.numel * math.prod(self.batch_shape))


def _check_block_size(block_size: int) -> None:
    if block_size not in VALID_BLOCK_SIZES:
        raise ValueError(
            f"NF4 block_size must be a power of two from 32 to 4096 (bitsandbytes' valid sizes "
            f"{list(VALID_BLOCK_SIZES)}), got {block_size!r}"
        )


def _rounded(x: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """``x`` as a materialised fp32 value: keeps the compiler from fusing ``x + c`` into an FMA.

    bitsandbytes rounds a product before adding to it; XLA:CPU contracts ``a * b + c`` into one
    fused multiply-add (one rounding), which moves some results by an ulp, and an
    ``optimization_barrier`` on the product does not stop it. An integer select on the bits
    (rewriting one NaN payload as the canonical NaN, so no value changes) sits between the
    multiply and the add and cannot be folded away.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = jnp.where(bits == jnp.uint32(0xFFFFFFFF), jnp.uint32(0x7FC00000), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _nearest_nf4(x: Float[Array, "*s"]) -> UInt8[Array, "*s"]:
    """Index of the nearest NF4 code: the count of midpoints strictly below ``x``.

    A 4-step branchless binary search over the 15 sorted midpoints (``torch.bucketize`` with
    ``right=False``), so a value exactly on a midpoint takes the lower code.
    """
    mid = jnp.asarray(NF4_MIDPOINTS)
    # The first step compares with a scalar: starting from a zeros array would let XLA
    # constant-fold the first gather into a weight-sized constant (seconds of compile per shape).
    idx = jnp.where(x > mid[7], 8, 0).astype(jnp.int32)
    for step in (4, 2, 1):
        idx = idx + jnp.where(x > mid[idx + (step - 1)], step, 0)
    return idx.astype(jnp.uint8)


def _quantize_4bit(
    x: Float[Array, " n"], block_size: int
) -> tuple[UInt8[Array, " half"], Float[Array, " nblocks"]]:
    """Packed NF4 codes and fp32 block absmax of a flat fp32 vector."""
    (n,) = x.shape
    n_blocks = -(-n // block_size)
    blocks = jnp.pad(x, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)  # zero padding never raises the max
    nonzero = absmax > 0
    recip = jnp.where(nonzero, 1.0 / jnp.where(nonzero, absmax, 1.0), 0.0)
    scaled = blocks * recip[:, None]
    if n % block_size:  # bitsandbytes divides the trailing partial block instead
        tail_max = absmax[-1]
        tail = ieee_divide(blocks[-1], jnp.where(tail_max > 0, tail_max, 1.0))
        scaled = scaled.at[-1].set(jnp.where(tail_max > 0, tail, 0.0))
    codes = _nearest_nf4(jnp.clip(scaled, -1.0, 1.0)).reshape(-1)
    # An odd n always ends inside a partial block (block sizes are even), whose padding scales to
    # 0.0 and so reads code 7, bitsandbytes' pad for the odd tail.
    codes = codes[: 2 * (-(-n // 2))]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.astype(jnp.uint8), absmax


def _quantize_dynamic_8bit(
    v: Float[Array, " n"],
) -> tuple[UInt8[Array, " n"], Float[Array, " nnested"]]:
    """8-bit dynamic codes and fp32 absmax of ``v`` in blocks of 256 (bitsandbytes' CPU LUT)."""
    (n,) = v.shape
    n_blocks = -(-n // NESTED_BLOCK_SIZE)
    blocks = jnp.pad(v, (0, n_blocks * NESTED_BLOCK_SIZE - n)).reshape(n_blocks, -1)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    nonzero = absmax > 0
    inv = 1.0 / jnp.where(nonzero, absmax, 1.0)
    x = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
    # The kernel's index is trunc(fl(fl(fl(fl(x + 1) * 0.5) * 65535) + 0.5)). With p the rounded
    # product that equals floor(p + 0.5), computed here with a compare instead of an add so that
    # no compiler can fuse the product and the add into an FMA.
    p = ((x + 1.0) * 0.5) * _LUT_SCALE
    whole = p.astype(jnp.int32)  # trunc == floor, p >= 0
    idx = whole + (p >= whole.astype(jnp.float32) + 0.5).astype(jnp.int32)
    codes = jnp.asarray(dynamic_quantize_lut())[idx]
    codes = jnp.where(nonzero[:, None], codes, jnp.uint8(0))
    return codes.reshape(-1)[:n], absmax


def nf4_quantize(
    w: Float[Array, "*shape"], block_size: int = 64, double_quant: bool = True
) -> NF4Weight:
    """Quantize a float array to NF4 (bitsandbytes ``quantize_4bit(..., quant_type="nf4")``).

    Args:
        w: weights of any float dtype and shape; blocks run over ``w`` flattened row-major, so pass
            the PyTorch layout ``[out, in]`` (transpose a JAX ``[in, out]`` kernel first) to match
            bitsandbytes.
        block_size: elements per block, a power of two from 32 to 4096.
        double_quant: also quantize the block absmax (``compress_statistics=True``).

    Returns:
        An ``NF4Weight`` with ``shape = w.shape``. For stacked layers use
        ``jax.vmap(nf4_quantize)`` (or ``jax.lax.map`` to bound memory). Under ``jax.jit`` mark
        ``block_size`` and ``double_quant`` static.
    """
    _check_block_size(block_size)
    dtype = jnp.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"nf4_quantize needs a floating-point array, got dtype {dtype.name}")
    shape = tuple(int(d) for d in w.shape)
    if math.prod(shape) == 0:
        raise ValueError(f"nf4_quantize needs a non-empty array, got shape {shape}")
    codes, absmax = _quantize_4bit(jnp.ravel(w).astype(jnp.float32), block_size)
    if double_quant:
        offset = torch_cpu_mean_f32(absmax)
        absmax, nested = _quantize_dynamic_8bit(absmax - offset)
    else:
        offset = jnp.zeros((), jnp.float32)
        nested = jnp.zeros((0,), jnp.float32)
    return NF4Weight(
        codes=codes,
        absmax=absmax,
        nested_absmax=nested,
        offset=offset,
        shape=shape,
        block_size=block_size,
        double_quant=double_quant,
        dtype=dtype.name,
    )


def nf4_block_absmax(q: NF4Weight) -> Float[Array, "*L nblocks"]:
    """The fp32 block absmax of ``q``, undoing double quantization if any.

    ``dynmap[q8] * nested_absmax[i // 256] + offset`` in fp32, as bitsandbytes'
    ``dequantize_blockwise`` followed by ``absmax += offset``.
    """
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    *lead, n_blocks = q.absmax.shape
    n_nested = q.nested_absmax.shape[-1]
    pad = [(0, 0)] * len(lead) + [(0, n_nested * NESTED_BLOCK_SIZE - n_blocks)]
    codes = jnp.pad(q.absmax, pad).astype(jnp.int32).reshape(*lead, n_nested, NESTED_BLOCK_SIZE)
    scaled = _rounded(jnp.asarray(dynamic_map())[codes] * q.nested_absmax[..., None])
    absmax = scaled.reshape(*lead, -1)[..., :n_blocks]
    return absmax + jnp.asarray(q.offset, jnp.float32)[..., None]


def nf4_dequantize(q: NF4Weight, dtype: jnp.dtype | str = jnp.float32) -> Array:
    """Dequantize an ``NF4Weight`` (bitsandbytes ``dequantize_4bit``), bit for bit.

    ``nf4[code] * absmax`` in fp32, then a cast to ``dtype``. Works on a single matrix
    (``-> [*shape]``) and on stacked ones (``-> [*L, *shape]``), and under ``jax.vmap``.
    The work is a nibble unpack (shifts), a 16-entry gather, and a broadcast multiply by block.
    """
    n, bs = q.numel, q.block_size
    n_blocks = q.n_blocks
    lead = q.codes.shape[:-1]
    absmax = nf4_block_absmax(q)  # [*L, nblocks]
    packed = q.codes.astype(jnp.int32)
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*lead, -1)  # [*L, 2*half]
    values = jnp.asarray(NF4_CODEBOOK)[codes]
    extra = n_blocks * bs - values.shape[-1]
    if extra > 0:
        values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, extra)])
    values = values[..., : n_blocks * bs].reshape(*lead, n_blocks, bs) * absmax[..., None]
    out = values.reshape(*lead, n_blocks * bs)[..., :n]
    return out.reshape(*lead, *q.shape).astype(dtype)


__all__ = [
    "NESTED_BLOCK_SIZE",
    "VALID_BLOCK_SIZES",
    "NF4Weight",
    "nf4_block_absmax",
    "nf4_dequantize",
    "nf4_quantize",
]
