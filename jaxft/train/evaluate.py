"""Validation loss of a model (with or without an adapter) over a config's validation split."""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxft.config import Config
from jaxft.errors import ConfigError
from jaxft.train import setup
from jaxft.train.objectives import objective_loss_fn
from jaxft.train.step import make_eval_step


def validation_loss(cfg: Config, config: Any, params: Any, lora: Any, tokenizer: Any,
                    reference: Any = None) -> dict[str, float]:
    """The validation metrics over the config's validation split, one pass, as training reports
    them: ``val_loss`` (token NLL for SFT; the objective's loss per pair for preference
    objectives) and the objective's other ``val_*`` means.

    ``params`` with ``lora`` (an adapter tree) or alone (a full model). The reference of a
    preference objective is the base with the adapter off; for a full model, ``reference``
    (the base it was trained from), or the model itself when that is not given (a base model
    is its own reference).
    """
    _, val, num_examples = setup.build_data(cfg, tokenizer)
    if val is None:
        raise ConfigError("no validation data: set data.validation or data.validation_fraction")
    method = "lora" if lora is not None else "full"
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": method})})
    step = jax.jit(make_eval_step(objective_loss_fn(cfg, config, num_examples)))
    if lora is not None:
        trainable, frozen = lora, params
    else:
        preference = cfg.train.objective != "sft"
        trainable = params
        frozen = (params if reference is None else reference) if preference else {}
    sums: dict[str, float] = {}
    with val:
        for batch in val:
            for k, v in jax.device_get(step(trainable, frozen, batch)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    n = sums.pop("tokens", 0.0)
    if not n:
        return {"val_loss": math.nan}
    return {"val_loss": sums.pop("loss_sum") / n, **{f"val_{k}": v / n for k, v in sums.items()}}
