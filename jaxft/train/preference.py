"""Preference losses (DPO / IPO / hinge / robust, KTO, ORPO, SimPO) as pure fp32 JAX functions.

Each loss matches the formula of TRL 1.x line by line (SPECS.md section 4); the docstrings name the
TRL file and function. Conventions shared by all of them:

- A preference batch is ``[2B, S]``: rows ``0..B-1`` are the chosen completions, rows ``B..2B-1``
  the rejected ones (TRL's ``logps.chunk(2, dim=0)``).
- Sequence log-probabilities are summed (or averaged) over completion tokens only: ``targets`` are
  the tokens shifted left and ``mask`` marks the targets that belong to the completion.
- With LoRA the reference model is the same base with the adapter switched off
  (``forward(..., lora=None)``), so a step holds one copy of the base weights.
- Packed batches (``jaxft.data.preference``) carry ``example_index`` per token (-1 on padding);
  ``preference_logprobs`` then sums per example with one segment sum, so the result is per example
  whatever the row layout.
- Every loss returns ``(scalar loss, metrics)``; metrics are scalars named as TRL logs them and are
  computed from ``stop_gradient`` values. ``valid`` (1 per pair or KTO unit that holds data; the
  last batch of a run holds fewer) restricts every mean to the valid units, which is what TRL
  computes on its smaller last batch. Under ``jit`` with a sharded batch the means are global,
  which equals TRL's ``accelerator.gather`` followed by ``mean``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxft.models import forward
from jaxft.models.config import LlamaConfig
from jaxft.train.losses import token_logprobs

Metrics = dict[str, Float[Array, ""]]
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
_LOG_HALF = -math.log(2.0)


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def _mean(x: Array, valid: Array | None) -> Array:
    """Mean of ``x``, over the entries where ``valid`` is set when it is given (0 if none is)."""
    if valid is None:
        return jnp.mean(x)
    keep = jnp.asarray(valid).astype(bool)
    return jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)


def sequence_logprobs(
    logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    mask: Array,
    average: bool = False,
) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
    """``(sum or mean over masked targets of log p(target), number of masked targets)`` per row.

    Matches ``get_batch_logps`` of ``trl/experimental/orpo/orpo_trainer.py`` and
    ``trl/experimental/cpo/cpo_trainer.py`` (``average_log_prob``), and the completion sums of
    ``DPOTrainer._compute_loss`` (``trl/trainer/dpo_trainer.py``). The mean divides by
    ``max(count, 1)`` (TRL's IPO clamp), so an empty row gives 0 instead of NaN.
    """
    return _row_sums(token_logprobs(logits, targets)[0], mask, average)


def _row_sums(logp: Array, mask: Array, average: bool) -> tuple[Array, Array]:
    keep = mask.astype(bool)
    total = jnp.sum(jnp.where(keep, logp, 0.0), axis=-1)
    count = jnp.sum(keep, axis=-1).astype(jnp.float32)
    if average:
        total = total / jnp.maximum(count, 1.0)
    return total, count


def preference_logprobs(
    config: LlamaConfig,
    params: Any,
    tokens: Int[Array, "b2 s"],
    targets: Int[Array, "b2 s"],
    completion_mask: Array,
    segment_ids: Int[Array, "b2 s"] | None = None,
    positions: Int[Array, "b2 s"] | None = None,
    *,
    lora: Any = None,
    average: bool = False,
    example_index: Int[Array, "r s"] | None = None,
    num_examples: int | None = None,
) -> tuple[Float[Array, " e"], Float[Array, " e"]]:
    """Per-example completion log-probs and token counts of a chosen-then-rejected batch.

    One forward pass over chosen and rejected sequences together (TRL's concatenated forward).
    Without ``example_index`` row ``k`` is example ``k`` (``[2B, S]``: chosen rows first). With it
    (packed rows, -1 on padding) example ``e`` sums the targets whose ``example_index`` is ``e``,
    for ``e < num_examples`` (static; default: the number of rows). The reference log-probs of a
    LoRA policy are the same call with ``lora=None``; wrap them in ``jax.lax.stop_gradient`` or
    precompute them once.
    """
    logp, _ = forward(config, params, tokens, lora=lora, segment_ids=segment_ids,
                      positions=positions, targets=targets)  # [b, t]: the logits are never kept
    if example_index is None:
        return _row_sums(logp, completion_mask, average)
    n = tokens.shape[0] if num_examples is None else num_examples
    keep = completion_mask.astype(bool) & (example_index >= 0)
    ids = jnp.where(keep, example_index, n).reshape(-1)  # masked targets go to a spare segment
    total = jax.ops.segment_sum(jnp.where(keep, logp, 0.0).reshape(-1), ids, n + 1)[:n]
    count = jax.ops.segment_sum(keep.reshape(-1).astype(jnp.float32), ids, n + 1)[:n]
    if average:
        total = total / jnp.maximum(count, 1.0)
    return total, count


def _pair_metrics(
    chosen_rewards: Array, rejected_rewards: Array, chosen: Array, rejected: Array,
    valid: Array | None,
) -> Metrics:
    """TRL's ``rewards/*`` and ``logps/*`` for paired losses: batch means over the pairs."""
    c, r = jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": _mean(c, valid),
        "rewards/rejected": _mean(r, valid),
        "rewards/margins": _mean(c - r, valid),
        "rewards/accuracies": _mean((c > r).astype(jnp.float32), valid),
        "logps/chosen": _mean(jax.lax.stop_gradient(_f32(chosen)), valid),
        "logps/rejected": _mean(jax.lax.stop_gradient(_f32(rejected)), valid),
    }


def dpo_loss(
    policy_chosen: Float[Array, " b"],
    policy_rejected: Float[Array, " b"],
    ref_chosen: Float[Array, " b"],
    ref_rejected: Float[Array, " b"],
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_count: Float[Array, " b"] | None = None,
    rejected_count: Float[Array, " b"] | None = None,
    valid: Array | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """DPO family loss (mean over pairs) and TRL's reward metrics.

    Matches ``DPOTrainer._compute_loss`` in ``trl/trainer/dpo_trainer.py`` (TRL 1.16,
    ``f_divergence_type="reverse_kl"``, one loss type, no WPO weighting), with
    ``delta = (lp_c - ref_c) - (lp_r - ref_r)``:

    - ``sigmoid``: ``-log sigmoid(beta * delta)`` (no label smoothing in TRL 1.x);
    - ``hinge``: ``relu(1 - beta * delta)``;
    - ``ipo``: ``(delta_avg - 1 / (2 * beta))^2`` on length-averaged log-ratios. Either pass
      length-averaged log-probs (then ``rewards/*`` are per-token too), or pass the sums and
      ``chosen_count`` / ``rejected_count``: the log-ratios are then divided by ``max(count, 1)``
      here, as TRL does, and ``rewards/*`` stay on TRL's summed scale;
    - ``robust`` (the TRL type that reads ``label_smoothing`` = flip probability ``eps``):
      ``(-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps)``.

    Rewards are ``beta * (lp - ref)`` per sequence; the metrics are their batch means. ``valid``
    (``[b]``, optional) limits the means to the pairs that hold data.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r}; use one of {DPO_LOSS_TYPES}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} must lie in [0, 0.5) for "
                         "loss_type='robust'")
    if loss_type != "robust" and label_smoothing:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} has no effect on "
                         f"loss_type={loss_type!r} in TRL 1.x; use loss_type='robust' for the "
                         "label-flip-robust DPO loss or set label_smoothing=0")
    chosen_logratios = _f32(policy_chosen) - _f32(ref_chosen)
    rejected_logratios = _f32(policy_rejected) - _f32(ref_rejected)
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        if (chosen_count is None) != (rejected_count is None):
            raise ValueError("dpo_loss: pass both chosen_count and rejected_count, or neither")
        if chosen_count is not None:
            delta = (chosen_logratios / jnp.maximum(_f32(chosen_count), 1.0)
                     - rejected_logratios / jnp.maximum(_f32(rejected_count), 1.0))
        losses = jnp.square(delta - 1.0 / (2.0 * beta))
    else:  # robust
        clean = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
        flipped = -label_smoothing * jax.nn.log_sigmoid(-beta * delta)
        losses = (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios, policy_chosen,
                            policy_rejected, valid)
    return _mean(losses, valid), metrics


def kto_loss(
    policy_lp: Float[Array, " b"],
    ref_lp: Float[Array, " b"],
    policy_kl_lp: Float[Array, " b"],
    ref_kl_lp: Float[Array, " b"],
    desirable_mask: Array,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    *,
    valid: Array | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """KTO loss (unpaired: each row is desirable or undesirable) and TRL's metrics.

    Matches ``KTOTrainer._compute_loss`` in ``trl/trainer/kto_trainer.py`` (``loss_type="kto"``).
    ``*_kl_lp`` are summed log-probs of the mismatched completions (TRL pairs prompt ``i`` with
    completion ``i - 1`` of the batch). ``z = max(0, mean(policy_kl_lp - ref_kl_lp))`` is
    detached; TRL takes the mean on each process, averages the process means
    (``gather_for_metrics``) and then clamps; under ``jit`` the mean here is over the global batch,
    the same number when the per-device batches have equal size. With ``r = lp - ref``:
    desirable ``1 - sigmoid(beta (r - z))``, undesirable ``1 - sigmoid(beta (z - r))``, and
    ``loss = mean(concat(w_D * L_D, w_U * L_U))`` (a mean over all rows).
    ``rewards/chosen`` / ``rewards/rejected`` average ``beta * r`` over the desirable / undesirable
    rows (0 when there are none; TRL skips the metric then). ``valid`` (``[b]``, optional) limits
    every mean, ``z`` included, to the rows that hold data.
    """
    live = jnp.ones(jnp.shape(policy_lp), bool) if valid is None else jnp.asarray(valid).astype(bool)
    desirable = jnp.asarray(desirable_mask).astype(bool) & live
    undesirable = ~jnp.asarray(desirable_mask).astype(bool) & live
    kl = _mean(_f32(policy_kl_lp) - _f32(ref_kl_lp), live)
    kl = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    logratios = _f32(policy_lp) - _f32(ref_lp)
    chosen_losses = 1.0 - jax.nn.sigmoid(beta * (logratios - kl))
    rejected_losses = 1.0 - jax.nn.sigmoid(beta * (kl - logratios))
    losses = jnp.where(desirable, desirable_weight * chosen_losses,
                       undesirable_weight * rejected_losses)

    rewards = jax.lax.stop_gradient(beta * logratios)
    lp = jax.lax.stop_gradient(_f32(policy_lp))
    chosen_reward, rejected_reward = _mean(rewards, desirable), _mean(rewards, undesirable)
    metrics = {
        "kl": kl,
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": _mean(lp, desirable),
        "logps/rejected": _mean(lp, undesirable),
        "count/chosen": jnp.sum(desirable).astype(jnp.float32),
        "count/rejected": jnp.sum(undesirable).astype(jnp.float32),
    }
    return _mean(losses, live), metrics


def _log1mexp(x: Array) -> Array:
    """``log(1 - exp(x))`` for ``x < 0``, branching at ``-ln 2`` as TRL's ``orpo_trainer.log1mexp``.

    ``x`` is clamped to ``<= -1e-12``: TRL returns ``-inf`` at ``x = 0`` (a row predicted with
    probability 1), which makes the ORPO gradient NaN; values at ``x <= -1e-12`` are unchanged.
    """
    x = jnp.minimum(x, -1e-12)
    low = x < _LOG_HALF
    # Feed each branch only its own range: the branch jnp.where discards must stay finite, or its
    # inf gradient times 0 is NaN (log1p(-exp(x)) is -inf at x = -1e-12 in fp32).
    lo = jnp.where(low, x, _LOG_HALF)
    hi = jnp.where(low, _LOG_HALF, x)
    return jnp.where(low, jnp.log1p(-jnp.exp(lo)), jnp.log(-jnp.expm1(hi)))


def orpo_loss(
    chosen_avg_lp: Float[Array, " b"],
    rejected_avg_lp: Float[Array, " b"],
    chosen_nll: Float[Array, ""],
    beta: float = 0.1,
    *,
    valid: Array | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """ORPO: ``chosen_nll - mean(beta * log sigmoid(log_odds))``.

    Matches ``ORPOTrainer.odds_ratio_loss`` and ``get_batch_loss_metrics`` in
    ``trl/experimental/orpo/orpo_trainer.py``: ``log_odds = (lp_c - lp_r) - (log1mexp(lp_c) -
    log1mexp(lp_r))`` on length-averaged completion log-probs. ``chosen_nll`` is TRL's NLL term: the
    mean cross-entropy over the chosen rows' *prompt and completion* tokens (every non-padding
    target; ``masked_nll`` sum / count with the attention mask of the targets).
    Rewards are ``beta * avg_lp``; ``log_odds_ratio`` is ``mean(log sigmoid(log_odds))`` and
    ``log_odds_chosen`` is ``mean(log_odds)``. ``valid`` limits the means to the pairs that hold
    data (``chosen_nll`` is already a mean over the valid chosen tokens).
    """
    chosen, rejected = _f32(chosen_avg_lp), _f32(rejected_avg_lp)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = _f32(chosen_nll)
    loss = nll - _mean(beta * ratio, valid)
    metrics = _pair_metrics(beta * chosen, beta * rejected, chosen, rejected, valid)
    metrics.update({
        "nll_loss": jax.lax.stop_gradient(nll),
        "log_odds_ratio": jax.lax.stop_gradient(_mean(ratio, valid)),
        "log_odds_chosen": jax.lax.stop_gradient(_mean(log_odds, valid)),
    })
    return loss, metrics


def simpo_loss(
    chosen_avg_lp: Float[Array, " b"],
    rejected_avg_lp: Float[Array, " b"],
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    *,
    chosen_nll: Float[Array, ""] | None = None,
    cpo_alpha: float = 0.0,
    valid: Array | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """SimPO: ``-log sigmoid(beta * ((avg_c - avg_r) - simpo_gamma / beta))``, no reference model.

    Matches ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` and ``get_batch_loss_metrics`` in
    ``trl/experimental/cpo/cpo_trainer.py`` (``alpha=0``): with ``label_smoothing`` ``eps`` the loss
    is ``-(1 - eps) log sigmoid(beta l) - eps log sigmoid(-beta l)``. Defaults are ``CPOConfig``'s
    (``beta=0.1``, ``simpo_gamma=0.5``; the SimPO paper tunes beta in 2.0-2.5). ``cpo_alpha > 0``
    adds ``cpo_alpha * chosen_nll`` (CPO-SimPO; ``CPOConfig`` defaults it to 1.0, pure SimPO is 0).
    Rewards are ``beta * avg_lp``; ``valid`` limits the means to the pairs that hold data.
    """
    chosen, rejected = _f32(chosen_avg_lp), _f32(rejected_avg_lp)
    logits = (chosen - rejected) - simpo_gamma / beta
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    loss = _mean(losses, valid)
    metrics = _pair_metrics(beta * chosen, beta * rejected, chosen, rejected, valid)
    if cpo_alpha:
        if chosen_nll is None:
            raise ValueError(f"simpo_loss: cpo_alpha={cpo_alpha} needs chosen_nll")
        loss = loss + cpo_alpha * _f32(chosen_nll)
        metrics["nll_loss"] = jax.lax.stop_gradient(_f32(chosen_nll))
    return loss, metrics
