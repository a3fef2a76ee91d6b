"""Loss functions of every training objective, in the form the one train step consumes.

``loss_fn(trainable, frozen, micro_batch, rng) -> (sum, aux)``: the step adds ``sum`` and every
``aux`` entry over micro-batches and divides all of them once by ``aux['tokens']``. SFT returns the
token NLL sum and the token count. Preference objectives return ``mean loss * n`` and metric
means ``* n`` with ``n`` the number of real pairs (KTO: examples) in the micro-batch, so a step's
loss is the mean over all its pairs.

The reference model is the base with the adapter switched off (``lora=None``: the same frozen
params, no second copy) for LoRA/QLoRA, and a frozen copy of the initial params for full
fine-tuning (``frozen`` then holds that copy).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxft.models.config import LlamaConfig
from jaxft.train.preference import (
    dpo_loss,
    kto_loss,
    orpo_loss,
    preference_logprobs,
    simpo_loss,
)
from jaxft.train.step import LossFn, sft_loss_fn

PAIR_OBJECTIVES = ("dpo", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def preference_loss_fn(config: LlamaConfig, method: str, objective: str, num_examples: int,
                       *, beta: float = 0.1, simpo_gamma: float = 0.5,
                       desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                       sft_weight: float = 0.0) -> LossFn:
    """Loss of a preference micro-batch (``jaxft.data.build_preference_iterators`` layout).

    ``sft_weight`` adds that multiple of the chosen completions' token-mean NLL to the DPO-family
    losses (TRL: ``loss_type=["sigmoid", "sft"]`` with ``loss_weights``; RPO), which keeps the
    chosen answers likely while the rejected ones are pushed down.
    """

    def logprobs(params: Any, lora: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        return preference_logprobs(
            config, params, batch["tokens"], batch["targets"], batch["loss_mask"],
            batch["segment_ids"], batch["positions"], lora=lora,
            example_index=batch["example_index"], num_examples=num_examples)

    def loss_fn(trainable: Any, frozen: Any, batch: dict, rng: jax.Array | None):
        del rng  # adapters run without dropout in preference training
        if method == "lora":
            policy_params, lora, ref_params = frozen, trainable, frozen
        else:
            policy_params, lora, ref_params = trainable, None, frozen
        lp, count = logprobs(policy_params, lora, batch)
        valid = batch["valid"].astype(jnp.float32)
        n = jnp.sum(valid)
        b = num_examples // 2
        ref = None
        if "ref_logps" in batch:  # precomputed once (train.precompute_ref)
            ref = batch["ref_logps"]
        elif objective not in REFERENCE_FREE:
            ref, _ = jax.lax.stop_gradient(logprobs(ref_params, None, batch))
        avg = lp / jnp.maximum(count, 1.0)
        # Mean NLL of the valid chosen completions' tokens (DPO's optional SFT term, ORPO's).
        chosen_nll = -jnp.sum(lp[:b] * valid) / jnp.maximum(jnp.sum(count[:b] * valid), 1.0)
        if objective in ("dpo", "hinge", "ipo"):
            loss_type = {"dpo": "sigmoid", "hinge": "hinge", "ipo": "ipo"}[objective]
            counts = dict(chosen_count=count[:b], rejected_count=count[b:]) \
                if objective == "ipo" else {}
            loss, metrics = dpo_loss(lp[:b], lp[b:], ref[:b], ref[b:], beta, loss_type,
                                     valid=valid, **counts)
            if sft_weight:
                metrics["nll_chosen"] = chosen_nll
                loss = loss + sft_weight * chosen_nll
        elif objective == "kto":
            loss, metrics = kto_loss(lp[:b], ref[:b], lp[b:], ref[b:],
                                     batch["label"].astype(jnp.float32), beta,
                                     desirable_weight, undesirable_weight, valid=valid)
        elif objective == "orpo":
            # The chosen completion's NLL given the prompt (the ORPO paper's L_SFT). TRL's
            # trainer also counts the prompt tokens; ``orpo_loss`` takes either, and its parity
            # tests use TRL's.
            loss, metrics = orpo_loss(avg[:b], avg[b:], chosen_nll, beta, valid=valid)
        elif objective == "simpo":
            loss, metrics = simpo_loss(avg[:b], avg[b:], beta, simpo_gamma, valid=valid)
        else:
            raise ValueError(f"unknown preference objective {objective!r}")
        # The policy alone prefers chosen (higher summed log-prob): meaningful before training too,
        # when the implicit rewards of a policy equal to its reference are all zero.
        metrics["policy_accuracy"] = jnp.sum((lp[:b] > lp[b:]) * valid) / jnp.maximum(n, 1.0)
        if ref is not None:  # KL to the reference, estimated per token on chosen/real completions
            ratio = (lp[:b] - ref[:b]) / jnp.maximum(count[:b], 1.0)
            metrics["kl_ref"] = jnp.sum(ratio * valid) / jnp.maximum(n, 1.0)
        aux = {"tokens": n, **{k: v * n for k, v in metrics.items()}}
        return loss * n, aux

    return loss_fn


def objective_loss_fn(cfg: Any, config: LlamaConfig, num_examples: int | None = None) -> LossFn:
    """The loss of ``cfg.train.objective`` (``sft`` or a preference objective)."""
    t = cfg.train
    if t.objective == "sft":
        dropout = t.method == "lora" and cfg.lora.dropout > 0
        return sft_loss_fn(config, t.method, cfg.optim.z_loss, dropout)
    return preference_loss_fn(config, t.method, t.objective, num_examples, beta=t.beta,
                              simpo_gamma=t.simpo_gamma,
                              desirable_weight=t.kto_desirable_weight,
                              undesirable_weight=t.kto_undesirable_weight,
                              sft_weight=t.dpo_sft_weight)
