"""Validation loss of a model (with or without an adapter) over a config's validation split."""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxft.config import Config
from jaxft.errors import ConfigError
from jaxft.train.step import make_eval_step, sft_loss_fn


def validation_loss(cfg: Config, config: Any, params: Any, lora: Any, tokenizer: Any) -> float:
    """Sum of token NLL over the validation split divided by its token count (one pass)."""
    from jaxft.data import build_iterators

    _, val = build_iterators(cfg.data, tokenizer)
    if val is None:
        raise ConfigError("no validation data: set data.validation or data.validation_fraction")
    method = "lora" if lora is not None else "full"
    step = jax.jit(make_eval_step(sft_loss_fn(config, method)))
    total, count = 0.0, 0.0
    with val:
        for batch in val:
            out = step(lora if lora is not None else params, params if lora is not None else {},
                       batch)
            total += float(out["loss_sum"])
            count += float(out["tokens"])
    return total / count if count else math.nan
