"""AdamW with warmup + cosine decay to a floor, no weight decay on norms, biases and DoRA magnitudes.

SPECS.md section 6: linear warmup from 0 over the first steps, then cosine decay to
``final_lr_ratio`` (10%) of the peak, reached exactly at the last update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_NO_DECAY_NAMES = {"scale", "bias", "norm", "m"}


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, max(total_steps - 1, 0))
    return min(int(round(warmup_ratio * total_steps)), max(total_steps - 1, 0))


def lr_schedule(
    peak: float,
    total_steps: int,
    warmup: int,
    final_ratio: float = 0.1,
    kind: str = "cosine",
) -> optax.Schedule:
    """Learning rate of update ``i`` (0-based): ``peak*(i+1)/warmup`` during warmup, then decay.

    Warmup starts above 0 so the first update is not wasted; the last update (``total_steps-1``)
    uses exactly ``final_ratio * peak``.
    """
    floor = peak * final_ratio
    decay_len = max(total_steps - 1 - warmup, 1)

    def schedule(count: jax.Array) -> jax.Array:
        i = jnp.asarray(count, jnp.float32)
        warm = peak * (i + 1) / max(warmup, 1)
        t = jnp.clip((i - warmup) / decay_len, 0.0, 1.0)
        if kind == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * t))
        elif kind == "linear":
            decayed = peak + (floor - peak) * t
        else:
            decayed = jnp.full_like(t, peak)
        return jnp.where(i < warmup, warm, decayed)

    return schedule


def decay_mask(tree: Any) -> Any:
    """True for leaves that get weight decay: matrices, not norms / biases / DoRA magnitudes."""

    def keep(path: tuple[Any, ...], leaf: Any) -> bool:
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return not (names & _NO_DECAY_NAMES) and getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(keep, tree)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled weight decay, masked)."""
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
