"""The custom-VJP LoRA matmul and SwiGLU against the same maths differentiated by JAX (fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.nn.linear import Linear, lora_matmul, swiglu
from jaxft.nn.lora import LoraWeights
from jaxft.nn.norm import Normed, rms_norm, rms_stats
from jaxft.quant.nf4 import nf4_dequantize, nf4_quantize

N, IN, OUT, R, SCALE = 48, 32, 40, 4, 2.0
F32 = jnp.dtype("float32")


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    x, gate, a, dy = (
        jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((N, IN), (N, IN), (IN, R), (N, OUT))
    )
    w = jnp.asarray(0.1 * rng.normal(size=(IN, OUT)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(R, OUT)), jnp.float32)
    return x, gate, w, a, b, dy


def _plain(x, xd, w, a, b, gate=None):
    h = x if gate is None else jax.nn.silu(gate) * x
    return h @ w + SCALE * ((h if xd is None else xd) @ a) @ b


def _assert_same_vjp(ours, plain, args, dy):
    out, vjp = jax.vjp(ours, *args)
    ref, ref_vjp = jax.vjp(plain, *args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5)
    for got, want in zip(jax.tree.leaves(vjp(dy)), jax.tree.leaves(ref_vjp(dy))):
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert err < 1e-6, f"relative gradient error {err:.2e}"


@pytest.mark.parametrize("kind", ["plain", "dropout", "swiglu_input"])
def test_lora_matmul_gradients(kind):
    x, gate, w, a, b, dy = _arrays()
    if kind == "plain":
        _assert_same_vjp(
            lambda x, w, a, b: lora_matmul(x, None, w, a, b, SCALE, F32),
            lambda x, w, a, b: _plain(x, None, w, a, b),
            (x, w, a, b),
            dy,
        )
    elif kind == "dropout":  # xd stands for the dropped-out input; the base weight is trained too
        xd = x * (jnp.arange(IN) % 3 != 0) * 1.5
        _assert_same_vjp(
            lambda x, xd, w, a, b: lora_matmul(x, xd, w, a, b, SCALE, F32),
            _plain,
            (x, xd, w, a, b),
            dy,
        )
    else:
        _assert_same_vjp(
            lambda x, g, w, a, b: lora_matmul((g, x), None, w, a, b, SCALE, F32),
            lambda x, g, w, a, b: _plain(x, None, w, a, b, g),
            (x, gate, w, a, b),
            dy,
        )


def test_lora_matmul_nf4_base():
    x, gate, w, a, b, dy = _arrays(1)
    q = nf4_quantize(w.T)  # bitsandbytes layout [out, in]
    w_deq = nf4_dequantize(q).T
    _assert_same_vjp(
        lambda x, g, a, b: lora_matmul((g, x), None, q, a, b, SCALE, F32),
        lambda x, g, a, b: _plain(x, None, w_deq, a, b, g),
        (x, gate, a, b),
        dy,
    )


def test_swiglu_gradient():
    x, gate, *_ = _arrays(2)
    dy = jnp.asarray(np.random.default_rng(3).normal(size=(N, IN)), jnp.float32)
    _assert_same_vjp(swiglu, lambda g, u: jax.nn.silu(g) * u, (gate, x), dy)


def test_nf4_base_without_adapter_keeps_no_dequantized_weight():
    """Gradient through a frozen NF4 layer equals the dense one, and what autodiff keeps for the
    backward pass is the 4-bit weight, not a dequantized copy."""
    x, _, w, *_ = _arrays(4)
    q = nf4_quantize(w.T)
    layer = Linear(OUT)
    got = jax.grad(lambda x: layer.apply({"params": {"kernel": q}}, x).sum())(x)
    dense = {"params": {"kernel": nf4_dequantize(q).T}}
    want = jax.grad(lambda x: layer.apply(dense, x).sum())(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    _, f_vjp = jax.vjp(lambda x: layer.apply({"params": {"kernel": q}}, x), x)
    kept = [leaf for leaf in jax.tree.leaves(f_vjp) if hasattr(leaf, "shape")]
    assert not any(
        tuple(leaf.shape) in ((IN, OUT), (OUT, IN)) and leaf.dtype == jnp.float32 for leaf in kept
    )


def test_lora_matmul_normed_input_gradients():
    """RMSNorm's output passed as its parts: the same values and gradients (to the norm's input
    and weight, the base weight and both factors) as the materialised norm differentiated by JAX,
    and the layer keeps the norm's input, not its output."""
    x, _, w, a, b, dy = _arrays(3)
    scale = jnp.asarray(np.random.default_rng(4).normal(size=IN), jnp.float32)

    def ours(x, scale, w, a, b):
        return lora_matmul(Normed(x, rms_stats(x, 1e-5), scale), None, w, a, b, SCALE, F32)

    _assert_same_vjp(ours, lambda x, s, w, a, b: _plain(rms_norm(x, s, 1e-5), None, w, a, b),
                     (x, scale, w, a, b), dy)
    _, vjp = jax.vjp(lambda x: ours(x, scale, w, a, b), x)
    kept = [leaf for leaf in jax.tree.leaves(vjp) if leaf.shape == (N, IN)]
    assert kept and all(np.array_equal(np.asarray(k), np.asarray(x)) for k in kept)  # x only


@pytest.mark.parametrize("adapter", [None, "lora", "dora", "dropout"])
def test_linear_normed_input_equals_its_value(adapter):
    """A ``Normed`` input gives the same output and gradients as its value on every path of
    ``Linear``: dense, plain LoRA (``lora_matmul`` recomputing the norm), DoRA and active
    dropout (both materialise it first)."""
    x, _, w, a, b, dy = _arrays(5)
    normed = Normed(x, rms_stats(x, 1e-5), jnp.linspace(0.5, 1.5, IN))
    variables = {"params": {"kernel": w}}
    if adapter is not None:
        m = jnp.linalg.norm(w, axis=0) * 1.1 if adapter == "dora" else None
        variables["lora"] = {"adapter": LoraWeights(
            a, b, m, alpha=8.0, dropout=0.5 if adapter == "dropout" else 0.0)}
    rngs = {"dropout": jax.random.key(2)} if adapter == "dropout" else None

    def run(xx, scale, value):
        inp = Normed(xx, rms_stats(xx, 1e-5), scale)
        inp = inp.value() if value else inp
        return Linear(OUT).apply(variables, inp, adapter != "dropout", rngs=rngs)

    got, vjp = jax.vjp(lambda xx, s: run(xx, s, False), x, normed.weight)
    want, ref_vjp = jax.vjp(lambda xx, s: run(xx, s, True), x, normed.weight)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for g, r in zip(vjp(dy), ref_vjp(dy)):
        err = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
        assert err < 1e-6, f"relative gradient error {err:.2e}"
