"""Constant code maps of bitsandbytes, built bit for bit in numpy.

- ``NF4_CODEBOOK``: the 16 NF4 values (``bitsandbytes.functional.get_4bit_type("nf4")``).
- ``create_dynamic_map``: the 8-bit dynamic map used for double quantization
  (``bitsandbytes.functional.create_dynamic_map``).
- ``dynamic_quantize_lut``: the 65536-entry table with which bitsandbytes' CPU kernel
  (``csrc/cpu_ops.cpp``, ``build_quantize_lut``) picks an 8-bit code.

Everything here is a small numpy constant computed on first use; nothing runs at import time
beyond building the 16-entry codebook.
"""

from __future__ import annotations

import functools

import numpy as np

_F32 = np.float32

NF4_CODEBOOK: np.ndarray = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=_F32,
)
NF4_CODEBOOK.setflags(write=False)

# Decision thresholds between neighbouring codes, in fp32 as bitsandbytes computes them
# (`(code[:-1] + code[1:]) / 2` in backends/default/ops.py::_get_4bit_quantize_bounds).
NF4_MIDPOINTS: np.ndarray = ((NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / _F32(2)).astype(_F32)
NF4_MIDPOINTS.setflags(write=False)

_LUT_SIZE = 65536


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``fl32(a * b + c)`` with one rounding, as a fused multiply-add gives.

    Exact for the operands used here: the product of an fp32 and a small integer, plus an fp32
    of similar magnitude, is exact in float64 and is rounded once to fp32.
    """
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(_F32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU, bit for bit.

    ATen (RangeFactoriesKernel.cpp) computes ``step`` in fp32, then the first half as
    ``start + step * i`` and the second half as ``end - step * (steps - 1 - i)``; the compiled
    kernel contracts both into fused multiply-adds, which this reproduces.
    """
    start32, end32 = _F32(start), _F32(end)
    step = _F32((end32 - start32) / _F32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    low = _fma_f32(np.full(half, step), i[:half].astype(_F32), np.full(half, start32))
    k = (steps - 1 - i[half:]).astype(_F32)
    high = _fma_f32(np.full(k.shape, -step), k, np.full(k.shape, end32))
    return np.concatenate([low, high])


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
    """The dynamic quantization map of bitsandbytes, as a sorted fp32 array of 2**total_bits.

    Mirrors ``bitsandbytes.functional.create_dynamic_map`` (Dettmers 2015, "8-Bit Approximations
    for Parallelism in Deep Learning"), including its fp32 rounding. The default arguments give
    the signed 8-bit map of double quantization: 127 negatives down to -0.99296874, 0.0 at index
    127, 128 positives up to 1.0. Maps of fewer than 8 bits are zero-padded to 256 entries, as in
    bitsandbytes.
    """
    data: list[np.ndarray] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def _means(n_boundaries: int, exponent: int) -> np.ndarray:
        bounds = _torch_linspace_f32(0.1, 1.0, n_boundaries)
        means = ((bounds[:-1] + bounds[1:]) / _F32(2)).astype(_F32)
        return (_F32(10.0**exponent) * means).astype(_F32)

    i = 0
    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1
        means = _means(fraction_items, -(max_exponent_bits - 1) + i)
        data += [means] + ([-means] if signed else [])
    if additional_items > 0:
        # bitsandbytes reuses the loop variable `i` (its last value) here.
        means = _means(additional_items + 1, -(max_exponent_bits - 1) + i)
        data += [means] + ([-means] if signed else [])
    values = np.concatenate([*data, np.array([0.0, 1.0], _F32)])
    if values.size != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
            f"total_bits={total_bits}) gives {values.size} values instead of {2**total_bits}"
        )
    # bitsandbytes always returns 256 entries: shorter maps are padded with zeros.
    values = np.concatenate([values, np.zeros(256 - values.size, _F32)])
    return np.sort(values).astype(_F32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map of double quantization, fp32 [256] (read-only)."""
    code = create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    code.setflags(write=False)
    return code


def build_quantize_lut(code: np.ndarray) -> np.ndarray:
    """Nearest-code table of bitsandbytes' CPU 8-bit quantizer, uint8 [65536].

    Entry ``i`` covers the normalised value ``-1 + 2 i / 65535`` (fp32) and holds the number of
    midpoints ``0.5 * (code[j] + code[j+1])`` strictly below it (csrc/cpu_ops.cpp,
    ``build_quantize_lut``). A value ``x`` in [-1, 1] is looked up at
    ``trunc(((x + 1) * 0.5) * 65535 + 0.5)``.
    """
    code = np.asarray(code, _F32)
    midpoints = (_F32(0.5) * (code[:-1] + code[1:])).astype(_F32)
    i = np.arange(_LUT_SIZE).astype(_F32)
    values = (_F32(-1.0) + (_F32(2.0) * i) / _F32(_LUT_SIZE - 1)).astype(_F32)
    return np.searchsorted(midpoints, values, side="left").astype(np.uint8)


@functools.cache
def dynamic_quantize_lut() -> np.ndarray:
    """``build_quantize_lut(dynamic_map())``, uint8 [65536] (read-only)."""
    lut = build_quantize_lut(dynamic_map())
    lut.setflags(write=False)
    return lut
