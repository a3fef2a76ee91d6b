"""The training step: a pure function of (state, frozen params, batch), jitted with shardings.

``state = {'step', 'trainable', 'opt_state', 'rng'}``. ``trainable`` is the adapter tree for
LoRA/QLoRA (the base stays in ``frozen`` and never enters the optimizer) or the whole parameter
tree for full fine-tuning. A step scans over its micro-batches, sums token losses and gradients,
and divides once by the token count of the whole step (all micro-batches, all devices): exact
accumulation (SPECS.md section 5). A step whose loss or gradient is not finite leaves the state
untouched and reports ``finite=False``; the loop decides to stop or go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxft.models.config import LlamaConfig
from jaxft.models.llama import forward
from jaxft.train.losses import masked_nll_from_logprobs

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]


def sft_loss_fn(config: LlamaConfig, method: str, z_loss: float = 0.0,
                use_dropout: bool = False) -> LossFn:
    """``(trainable, frozen, micro_batch, rng) -> (sum of token NLL, {'tokens': count})``."""

    def loss_fn(trainable: Any, frozen: Any, batch: Batch, rng: jax.Array | None):
        params, lora = (frozen, trainable) if method == "lora" else (trainable, None)
        logp, lse = forward(config, params, batch["tokens"], lora=lora,
                            segment_ids=batch["segment_ids"], positions=batch["positions"],
                            dropout_rng=rng if use_dropout else None, targets=batch["targets"])
        total, count = masked_nll_from_logprobs(logp, lse, batch["loss_mask"], z_loss)
        return total, {"tokens": count}

    return loss_fn


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation,
              schedule: optax.Schedule | None = None) -> Callable[..., tuple[dict, dict]]:
    """The un-jitted step; batch leaves are ``[accum, micro_batch, seq]``."""

    def step(state: dict[str, Any], frozen: Any, batch: Batch) -> tuple[dict, dict]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        trainable = state["trainable"]
        accum = jax.tree.leaves(batch)[0].shape[0]

        def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            g_acc, s_acc, aux_acc = carry
            micro, i = xs
            (s, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, frozen, micro, jax.random.fold_in(rng, i))
            add = lambda a, b: a + b  # noqa: E731
            return (jax.tree.map(add, g_acc, g), s_acc + s, jax.tree.map(add, aux_acc, aux)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        aux0 = jax.eval_shape(lambda: loss_fn(trainable, frozen, jax.tree.map(lambda x: x[0], batch),
                                              rng)[1])
        aux0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux0)
        carry0 = (zeros, jnp.float32(0), aux0)
        if accum == 1:  # no loop: the step's buffers are not nested in a while loop
            g, total, aux = body(carry0, (jax.tree.map(lambda x: x[0], batch), 0))[0]
        else:
            (g, total, aux), _ = jax.lax.scan(body, carry0, (batch, jnp.arange(accum)))
        denom = jnp.maximum(aux["tokens"], 1.0)
        grads = jax.tree.map(lambda x, p: (x / denom).astype(p.dtype), g, trainable)
        loss = total / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "trainable": jax.tree.map(keep, new_trainable, trainable),
            "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
            "rng": state["rng"],
        }
        # aux entries other than the normaliser are sums too: divide them the same way.
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   **{k: (v if k == "tokens" else v / denom) for k, v in aux.items()}}
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn) -> Callable[..., dict[str, jax.Array]]:
    """``(trainable, frozen, batch [b, s]) -> {'loss_sum', 'tokens', ...}`` without dropout."""

    def eval_step(trainable: Any, frozen: Any, batch: Batch) -> dict[str, jax.Array]:
        total, aux = loss_fn(trainable, frozen, batch, None)
        return {"loss_sum": total, **aux}  # sums: divide by the summed aux['tokens']

    return eval_step


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": tx.init(trainable),
        "rng": jax.random.PRNGKey(seed),
    }
