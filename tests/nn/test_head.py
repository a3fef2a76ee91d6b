"""The fused output layer + log-probabilities against logits formed in full and differentiated by
JAX: values, the input gradient, the weight gradient when trained, chunking with padding, bf16,
and the model's ``forward(..., targets=...)`` against ``token_logprobs(forward(...))``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import LlamaConfig, forward, init_params
from jaxft.nn.head import chunk_rows, head_logprobs, token_logprobs
from jaxft.peft import LoraSpec, lora_init


def _plain(x, w, t):
    logits = jnp.dot(x, w).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - lse, lse


def _data(n=70, h=24, v=97, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h)), dtype)
    w = jnp.asarray(rng.normal(size=(h, v)) / np.sqrt(h) * 3, dtype)
    t = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    c = jnp.asarray(rng.normal(size=(2, n)), jnp.float32)  # cotangents of logp and lse
    return x, w, t, c


def _objective(fn, c):
    def f(x, w, t):
        logp, lse = fn(x, w, t)
        return jnp.sum(logp * c[0]) + jnp.sum(jnp.square(lse) * c[1])

    return f


@pytest.mark.parametrize("rows", [16, 32, 70, None])  # 70 rows: chunks of 16 pad the last one
def test_values_and_gradients_match_plain_logits(rows):
    x, w, t, c = _data()
    fused = lambda x, w, t: head_logprobs(x, w, t, rows)  # noqa: E731
    got, want = fused(x, w, t), _plain(x, w, t)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-6, atol=2e-6)
    gx, gw = jax.grad(_objective(fused, c), argnums=(0, 1))(x, w, t)
    rx, rw = jax.grad(_objective(_plain, c), argnums=(0, 1))(x, w, t)
    scale_x, scale_w = float(jnp.abs(rx).max()), float(jnp.abs(rw).max())
    assert float(jnp.abs(gx - rx).max()) / scale_x < 2e-6
    assert float(jnp.abs(gw - rw).max()) / scale_w < 2e-6


def test_frozen_weight_keeps_neither_logits_nor_input():
    """Only ``x`` differentiated: the residuals are ``E`` [n, h], ``lse`` and the weight; no
    [n, V] array survives the forward pass."""
    x, w, t, c = _data(n=64, h=8, v=4096)
    f = _objective(lambda x, w, t: head_logprobs(x, w, t, 16), c)
    _, vjp = jax.vjp(lambda x: f(x, w, t), x)
    shapes = [leaf.shape for leaf in jax.tree.leaves(vjp)]
    assert (64, 4096) not in shapes and (4, 16, 4096) not in shapes
    assert shapes.count((64, 8)) == 1  # E only; x is kept only when w is trained:
    _, vjp_w = jax.vjp(lambda x, w: f(x, w, t), x, w)
    assert [leaf.shape for leaf in jax.tree.leaves(vjp_w)].count((64, 8)) == 2
    gx = vjp(jnp.float32(1.0))[0]
    rx = jax.grad(_objective(_plain, c))(x, w, t)
    assert float(jnp.abs(gx - rx).max()) / float(jnp.abs(rx).max()) < 2e-6


def test_only_logp_differentiated_and_bf16():
    x, w, t, _ = _data(dtype=jnp.bfloat16)
    logp, lse = head_logprobs(x, w, t, 32)
    assert logp.dtype == lse.dtype == jnp.float32
    ref = _plain(x, w, t)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(ref[0]), atol=2e-2, rtol=1e-2)
    gx = jax.grad(lambda x: head_logprobs(x, w, t, 32)[0].sum())(x)
    rx = jax.grad(lambda x: _plain(x, w, t)[0].sum())(x)
    assert gx.dtype == jnp.bfloat16
    err = float(jnp.abs(gx.astype(jnp.float32) - rx.astype(jnp.float32)).max())
    assert err / float(jnp.abs(rx.astype(jnp.float32)).max()) < 2e-2


def test_chunk_rows():
    assert chunk_rows(2048, 8192) == 512
    assert chunk_rows(2048, 128_256) == 256
    assert chunk_rows(100, 8192) == 100
    assert chunk_rows(10_000, 256) == 10_000  # 16,384 rows fit: one chunk
    assert chunk_rows(100_000, 256) == 16_384


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_forward_with_targets_matches_logits(tied, method):
    """LoRA: the frozen head's fused path; full: the head (or tied embedding) is trained too."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.key(0))
    lora = lora_init(jax.random.key(1), cfg, params, LoraSpec(r=4, alpha=8, targets=("q_proj",)))
    lora = jax.tree.map(lambda a: a + 0.01, lora)  # nonzero B: a live adapter
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 300, (2, 16)), jnp.int32)
    tgt = jnp.roll(tokens, -1, axis=1)
    got = forward(cfg, params, tokens, lora=lora, targets=tgt)
    want = token_logprobs(forward(cfg, params, tokens, lora=lora), tgt)
    for g, r in zip(got, want):
        assert g.shape == (2, 16)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)

    def run(tree, fused):
        p, lo = (params, tree) if method == "lora" else (tree, None)
        if fused:
            logp, lse = forward(cfg, p, tokens, lora=lo, targets=tgt)
        else:
            logp, lse = token_logprobs(forward(cfg, p, tokens, lora=lo), tgt)
        return jnp.sum(logp) + 1e-2 * jnp.sum(lse * lse)

    tree = lora if method == "lora" else params
    g1, g2 = jax.grad(run)(tree, True), jax.grad(run)(tree, False)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        assert float(jnp.abs(a - b).max()) / scale < 1e-5, jax.tree_util.keystr(path)
