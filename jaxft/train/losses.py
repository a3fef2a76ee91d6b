"""Token losses that return ``(sum, count)`` so that division happens once per optimizer step.

SPECS.md section 5: the loss of a step is the sum of token NLL over all micro-batches and devices
divided by the total count of unmasked target tokens; a mean per micro-batch averaged over
micro-batches is wrong whenever lengths differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def token_logprobs(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"]
) -> tuple[Float[Array, "b t"], Float[Array, "b t"]]:
    """Log-probability of each target and ``logsumexp`` of each row, in fp32.

    A custom VJP keeps only the logits (in their own dtype) and ``lse``: the gradient
    ``onehot * g_logp + (g_lse - g_logp) * softmax`` is then one pass over the logits, where
    autodiff would also keep the exponentials and scatter the target's gradient.
    """
    return _logprobs(logits, targets.astype(jnp.int32))


@jax.custom_vjp
def _logprobs(logits: Array, targets: Array) -> tuple[Array, Array]:
    return _logprobs_fwd(logits, targets)[0]


def _logprobs_fwd(logits: Array, targets: Array) -> tuple[tuple[Array, Array], tuple]:
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]  # a gather
    return (picked - lse, lse), (logits, targets, lse)


def _logprobs_bwd(res: tuple, cotangents: tuple[Array, Array]) -> tuple[Array, None]:
    logits, targets, lse = res
    g_logp, g_lse = cotangents
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    d_logits = jnp.where(hit, g_logp[..., None], 0.0) + (g_lse - g_logp)[..., None] * probs
    return d_logits.astype(logits.dtype), None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def masked_nll(
    logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    loss_mask: Array,
    z_loss: float = 0.0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``(sum over masked tokens of -log p(target) [+ z_loss * lse^2], number of masked tokens)``.

    ``targets[b, t]`` is the token that position ``t`` predicts (already shifted); ``loss_mask`` is
    1 where that target is trained. The optional z-loss (PaLM) keeps ``logsumexp`` near 0.
    """
    logp, lse = token_logprobs(logits, targets)
    mask = loss_mask.astype(jnp.float32)
    per_token = -logp
    if z_loss:
        per_token = per_token + z_loss * jnp.square(lse)
    return jnp.sum(per_token * mask), jnp.sum(mask)
