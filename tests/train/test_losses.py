"""Token losses: the custom-VJP log-probabilities against plain log-softmax differentiated by JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.train.losses import masked_nll, token_logprobs


def _plain_nll(logits, targets, mask, z_loss):
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    m = mask.astype(jnp.float32)
    return jnp.sum((-logp + z_loss * jnp.square(lse)) * m), jnp.sum(m)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_masked_nll_and_gradient_match_plain(z_loss):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(4 * rng.normal(size=(3, 7, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (3, 7)))
    got, ref = masked_nll(logits, targets, mask, z_loss), _plain_nll(logits, targets, mask, z_loss)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
    assert float(got[1]) == float(ref[1])
    grad = jax.grad(lambda x: masked_nll(x, targets, mask, z_loss)[0])(logits)
    want = jax.grad(lambda x: _plain_nll(x, targets, mask, z_loss)[0])(logits)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=0, atol=1e-6)


def test_logprobs_gradient_keeps_the_logits_dtype():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 11)), jnp.bfloat16)
    targets = jnp.zeros((2, 5), jnp.int32)
    logp, lse = token_logprobs(logits, targets)
    assert logp.dtype == lse.dtype == jnp.float32
    grad = jax.grad(lambda x: token_logprobs(x, targets)[0].sum())(logits)
    assert grad.dtype == jnp.bfloat16
    # d logp / d logits = onehot - softmax: each row sums to 0.
    np.testing.assert_allclose(np.asarray(grad, np.float32).sum(-1), 0.0, atol=2e-2)
