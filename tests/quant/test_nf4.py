"""NF4 quantization against bitsandbytes on the CPU: codes, scales and dequantized bits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.quant import NF4_CODEBOOK, NF4Weight, create_dynamic_map, nf4_dequantize, nf4_quantize
from jaxft.quant._maps import NF4_MIDPOINTS
from jaxft.quant._torch_sum import torch_cpu_mean_f32, torch_cpu_sum_f32
from jaxft.quant.nf4 import _quantize_dynamic_8bit

JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
quantize_jit = jax.jit(nf4_quantize, static_argnames=("block_size", "double_quant"))
dequantize_jit = jax.jit(nf4_dequantize, static_argnames=("dtype",))


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _weights(kind: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    flat = w.reshape(-1)
    if kind == "outliers":  # a few huge values, in both signs, in many blocks
        idx = rng.choice(flat.size, size=flat.size // 97, replace=False)
        flat[idx] *= rng.choice([-1e3, 1e3, 50.0], size=idx.size)
    elif kind == "zero_block":  # a whole block of zeros, and a trailing partial block of zeros
        flat[128:192] = 0.0
        flat[(flat.size // 64) * 64 :] = 0.0
    elif kind == "scaled":  # per-row scales spanning 6 decades
        w *= np.logspace(-3, 3, shape[0], dtype=np.float32).reshape(-1, *([1] * (w.ndim - 1)))
    return w


def _assert_matches_bnb(bnb, w: np.ndarray, dtype: str, block_size: int = 64, dq: bool = True):
    packed, state = bnb.quantize(w, dtype, block_size, dq)
    x = jnp.asarray(w).astype(JNP_DTYPES[dtype])
    q = quantize_jit(x, block_size=block_size, double_quant=dq)
    assert q.shape == w.shape and q.dtype == dtype and q.block_size == block_size
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    if dq:
        np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
        np.testing.assert_array_equal(_bits(q.nested_absmax), _bits(state.state2.absmax.numpy()))
        assert _bits(q.offset) == _bits(state.offset.numpy())
    else:
        # bitsandbytes clamps an all-zero trailing block's absmax to 1e-38; jaxft keeps 0.0.
        ref = state.absmax.numpy().copy()
        ref[ref <= 1e-38] = 0.0
        np.testing.assert_array_equal(_bits(q.absmax), _bits(ref))
    for out_dtype in {dtype, "float32"}:
        ref = bnb.dequantize(packed, state, out_dtype)
        got = np.asarray(dequantize_jit(q, dtype=JNP_DTYPES[out_dtype]))
        assert got.dtype == JNP_DTYPES[out_dtype] and got.shape == w.shape
        np.testing.assert_array_equal(_bits(got.astype(np.float32)), _bits(ref))
        if w.ndim == 2 and w.shape[1] % block_size == 0:  # bnb's own kernel, natural shape
            ref2 = bnb.dequantize(packed, state, out_dtype, flat=False)
            np.testing.assert_array_equal(_bits(got.astype(np.float32)), _bits(ref2))
    return q


# (kind, shape): element counts off the block grid, > 256 blocks, odd counts, big rows.
CASES = [
    ("normal", (300, 70)),  # 21000 elements, 329 blocks, partial last block
    ("normal", (301, 71)),  # odd element count
    ("normal", (1024, 1000)),  # 16000 blocks: 63 nested blocks, 3 summation levels
    ("normal", (128, 4096)),  # rows a multiple of the block size
    ("normal", (33, 96)),  # rows of 1.5 blocks
    ("normal", (7,)),  # smaller than one block
    ("outliers", (300, 70)),
    ("zero_block", (301, 71)),
    ("scaled", (256, 192)),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("kind", "shape"), CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in CASES]
)
def test_quantize_and_dequantize_match_bnb(bnb, kind, shape, dtype):
    _assert_matches_bnb(bnb, _weights(kind, shape), dtype)


@pytest.mark.parametrize("block_size", [32, 128, 256, 4096])
def test_block_sizes_match_bnb(bnb, block_size):
    _assert_matches_bnb(bnb, _weights("normal", (300, 70), seed=1), "float32", block_size)


@pytest.mark.parametrize("kind", ["normal", "zero_block"])
def test_without_double_quant_matches_bnb(bnb, kind):
    q = _assert_matches_bnb(bnb, _weights(kind, (301, 71), seed=2), "bfloat16", dq=False)
    assert q.absmax.dtype == jnp.float32 and q.nested_absmax.shape == (0,)


def test_values_on_midpoints_take_the_lower_code(bnb):
    # One block whose absmax is 1.0, so scaled values are the inputs themselves.
    mids = NF4_MIDPOINTS
    vals = np.concatenate([mids, -mids, [1.0], np.nextafter(mids, 2), np.nextafter(mids, -2)])
    w = np.zeros(64, np.float32)
    w[: vals.size] = vals
    q = _assert_matches_bnb(bnb, np.tile(w, 3), "float32")
    codes = np.asarray(q.codes)[: mids.size // 2 + 1]
    unpacked = np.stack([codes >> 4, codes & 0xF], -1).reshape(-1)[: mids.size]
    np.testing.assert_array_equal(unpacked, np.arange(15))  # midpoint j -> code j, not j + 1


def _divide_multiply_pairs(count: int) -> list[tuple[np.float32, np.float32]]:
    """(absmax, x) with ``x / absmax`` and ``x * (1 / absmax)`` on opposite sides of a midpoint."""
    rng = np.random.default_rng(0)
    pairs = []
    while len(pairs) < count:
        a = np.float32(rng.uniform(0.5, 4))
        m = NF4_MIDPOINTS[rng.integers(0, 15)]
        for x in np.nextafter(np.float32(m * a), np.float32([-10, 0, 10]), dtype=np.float32):
            divided, multiplied = x / a, x * (np.float32(1) / a)
            if abs(x) <= a and (divided > m) != (multiplied > m):
                pairs.append((a, x))
                break
    return pairs


def test_whole_blocks_multiply_and_the_partial_block_divides(bnb):
    for a, x in _divide_multiply_pairs(4):
        w = np.zeros(64 + 2, np.float32)
        w[:2] = w[64:] = [a, x]  # the same two values in a whole block and in the partial one
        q = _assert_matches_bnb(bnb, w, "float32")
        _leaves_equal(nf4_quantize(jnp.asarray(w)), q)  # eager too
        codes = np.asarray(q.codes)
        assert codes[0] & 0xF != codes[32] & 0xF  # the two scalings give different codes for x


def test_codebook_and_dynamic_map_match_bnb(bnb):
    np.testing.assert_array_equal(
        _bits(NF4_CODEBOOK), _bits(bnb.F.get_4bit_type("nf4", device="cpu").numpy())
    )
    for args in [(True, 7, 8), (False, 7, 8), (True, 5, 8), (True, 3, 6)]:
        ours = create_dynamic_map(*args)
        np.testing.assert_array_equal(_bits(ours), _bits(bnb.F.create_dynamic_map(*args).numpy()))
    dyn = create_dynamic_map()
    assert dyn[127] == 0.0 and dyn[-1] == 1.0 and np.float32(dyn[0]) == np.float32(-0.99296874)


@pytest.mark.parametrize("n", [1, 7, 9, 100, 329, 8193, 140_000])
def test_offset_sum_order_matches_torch(bnb, n):
    # 140000 elements reach all four cascade levels of torch's sum.
    rng = np.random.default_rng(n)
    x = (np.abs(rng.standard_normal(n)) * rng.uniform(0.5, 5) + rng.uniform(0, 3)).astype(
        np.float32
    )
    t = bnb.torch.from_numpy(x)
    assert _bits(jax.jit(torch_cpu_sum_f32)(x)) == _bits(t.sum().numpy())
    assert _bits(jax.jit(torch_cpu_mean_f32)(x)) == _bits(t.mean().numpy())


def test_nested_8bit_quantizer_matches_bnb_blockwise(bnb):
    rng = np.random.default_rng(3)
    quantize = jax.jit(_quantize_dynamic_8bit)
    for n in [1, 9, 256, 263, 329, 1000]:
        for trial in range(4):
            v = (rng.standard_normal(n) * rng.uniform(1e-3, 10)).astype(np.float32)
            if trial == 0:
                v[:256] = 0.0  # an all-zero block gets code 0
            if trial == 1:
                v = 3 * create_dynamic_map()[rng.integers(0, 256, n)]  # on the code points
            ref, state = bnb.F.quantize_blockwise(bnb.torch.from_numpy(v), blocksize=256)
            codes, absmax = quantize(jnp.asarray(v))
            np.testing.assert_array_equal(np.asarray(codes), ref.numpy())
            np.testing.assert_array_equal(_bits(absmax), _bits(state.absmax.numpy()))


def _leaves_equal(a: NF4Weight, b: NF4Weight) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(_bits(x), _bits(y))


def test_eager_jit_and_vmap_give_the_same_bytes():
    # [L, out, in], an odd element count with a partial last block
    stack = np.stack([_weights("outliers", (95, 71), seed=s) for s in range(3)])
    stack = jnp.asarray(stack).astype(jnp.bfloat16)
    eager = [nf4_quantize(stack[i]) for i in range(3)]
    jitted = [quantize_jit(stack[i]) for i in range(3)]
    stacked = jax.jit(jax.vmap(nf4_quantize))(stack)
    assert stacked.shape == (95, 71) and stacked.batch_shape == (3,)
    assert stacked.codes.shape == (3, (95 * 71 + 1) // 2) and stacked.offset.shape == (3,)
    dense = nf4_dequantize(stacked, jnp.bfloat16)
    assert dense.shape == (3, 95, 71)
    np.testing.assert_array_equal(
        _bits(jax.vmap(nf4_dequantize)(stacked)), _bits(nf4_dequantize(stacked))
    )
    for i in range(3):
        _leaves_equal(eager[i], jitted[i])
        layer = jax.tree.map(lambda x, i=i: x[i], stacked)
        _leaves_equal(eager[i], layer)
        assert layer.shape == (95, 71) and layer.batch_shape == ()
        np.testing.assert_array_equal(
            _bits(dense[i]), _bits(nf4_dequantize(eager[i], jnp.bfloat16))
        )


def test_nf4_weight_is_a_pytree_with_static_metadata():
    q = nf4_quantize(jnp.ones((4, 64)), block_size=32)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 4  # codes, absmax, nested_absmax, offset
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert (rebuilt.shape, rebuilt.block_size, rebuilt.double_quant, rebuilt.dtype) == (
        (4, 64),
        32,
        True,
        "float32",
    )
    out = jax.jit(lambda q: nf4_dequantize(q) * 2)(q)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.ones((4, 64), np.float32))


def test_storage_is_4_127_bits_per_parameter():
    spec = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    dq = jax.eval_shape(functools.partial(nf4_quantize, double_quant=True), spec)
    plain = jax.eval_shape(functools.partial(nf4_quantize, double_quant=False), spec)
    assert dq.bits_per_param == pytest.approx(4.127, rel=0.01)
    assert plain.bits_per_param == pytest.approx(4.5, rel=0.01)
    assert dq.nbytes == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024 + 4
    stacked = jax.eval_shape(
        jax.vmap(nf4_quantize), jax.ShapeDtypeStruct((2, 4096, 4096), jnp.bfloat16)
    )
    assert stacked.bits_per_param == pytest.approx(dq.bits_per_param)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="power of two from 32 to 4096"):
        nf4_quantize(jnp.ones((4, 64)), block_size=48)
    with pytest.raises(ValueError, match="got 8192"):
        nf4_quantize(jnp.ones((4, 64)), block_size=8192)
    with pytest.raises(TypeError, match="floating-point"):
        nf4_quantize(jnp.ones((4, 64), jnp.int32))
    with pytest.raises(ValueError, match="non-empty"):
        nf4_quantize(jnp.ones((0, 64)))
