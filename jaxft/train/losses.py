"""Token losses that return ``(sum, count)`` so that division happens once per optimizer step.

SPECS.md section 5: the loss of a step is the sum of token NLL over all micro-batches and devices
divided by the total count of unmasked target tokens; a mean per micro-batch averaged over
micro-batches is wrong whenever lengths differ.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxft.nn.head import token_logprobs

__all__ = ["masked_nll", "masked_nll_from_logprobs", "token_logprobs"]


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
    return masked_nll_from_logprobs(*token_logprobs(logits, targets), loss_mask, z_loss)


def masked_nll_from_logprobs(
    logp: Float[Array, "b t"],
    lse: Float[Array, "b t"],
    loss_mask: Array,
    z_loss: float = 0.0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``masked_nll`` from the targets' log-probabilities and ``logsumexp`` (``token_logprobs``,
    or ``forward(..., targets=...)``, which never forms the logits)."""
    mask = loss_mask.astype(jnp.float32)
    per_token = -logp
    if z_loss:
        per_token = per_token + z_loss * jnp.square(lse)
    return jnp.sum(per_token * mask), jnp.sum(mask)
