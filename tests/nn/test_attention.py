"""The custom-VJP ``causal_attention`` against plain attention differentiated by JAX (fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.nn.attention import attention_mask, causal_attention, dot_product_attention

CASES = {  # name: (b, t, hq, hk, d, block, window, packed)
    "gqa_blocks": (2, 64, 4, 2, 8, 16, 0, False),
    "mqa_window_packed": (2, 48, 4, 1, 8, 16, 5, True),
    "mha_one_block": (1, 24, 2, 2, 16, 128, 0, True),
    "gqa3_window_blocks": (2, 64, 6, 2, 8, 16, 20, True),
}


def _reference(q, k, v, segment_ids, window):
    b, t = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    mask = attention_mask(index, index, segment_ids, segment_ids, window)
    return dot_product_attention(q, k, v, mask)


def _inputs(b, t, hq, hk, d, packed, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, ct = (
        jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (hq, hk, hk, hq)
    )
    segment_ids = np.ones((b, t), np.int32)
    if packed:  # two examples and trailing padding per row
        segment_ids[:, t // 3 :] = 2
        segment_ids[:, t - 5 :] = 0
    return q, k, v, ct, jnp.asarray(segment_ids)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_plain_attention(name):
    b, t, hq, hk, d, block, window, packed = CASES[name]
    q, k, v, ct, segment_ids = _inputs(b, t, hq, hk, d, packed)
    valid = (segment_ids != 0)[:, :, None, None]  # padding rows: zeros here, uniform there
    ct = ct * valid

    def ours(q, k, v):
        return causal_attention(q, k, v, segment_ids, window, block)

    def plain(q, k, v):
        return _reference(q, k, v, segment_ids, window)

    out, vjp = jax.vjp(ours, q, k, v)
    ref, ref_vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(np.asarray(out * valid), np.asarray(ref * valid), rtol=0, atol=2e-6)
    for got, want, what in zip(vjp(ct), ref_vjp(ct), "qkv"):
        scale = float(jnp.max(jnp.abs(want)))
        err = float(jnp.max(jnp.abs(got - want))) / scale
        assert err < 2e-6, f"{name}: d{what} relative error {err:.2e}"


def test_padding_rows_give_zeros_and_finite_gradients():
    q, k, v, ct, segment_ids = _inputs(1, 32, 2, 1, 8, packed=True)
    out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, segment_ids, 0, 16), q, k, v)
    assert float(jnp.abs(out[:, -5:]).max()) == 0.0
    assert all(bool(jnp.isfinite(g).all()) for g in vjp(ct))


def test_window_and_segments_matter():
    """Guard against a test that cannot fail: both the window and the segments change outputs."""
    q, k, v, _, segment_ids = _inputs(1, 48, 2, 1, 8, packed=True)
    base = causal_attention(q, k, v, segment_ids, 0, 16)
    assert float(jnp.abs(causal_attention(q, k, v, segment_ids, 4, 16) - base).max()) > 1e-2
    ones = jnp.ones_like(segment_ids)
    assert float(jnp.abs(causal_attention(q, k, v, ones, 0, 16) - base)[:, 20:40].max()) > 1e-2


def test_bfloat16_follows_the_reference():
    q, k, v, ct, segment_ids = _inputs(2, 32, 4, 2, 16, packed=False)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v, ct)]
    out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, segment_ids, 0, 16), *low[:3])
    assert out.dtype == jnp.bfloat16
    ref, ref_vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, segment_ids, 0), q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=0, atol=3e-2)
    for got, want in zip(vjp(low[3]), ref_vjp(ct)):
        assert got.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        assert err < 2e-2
