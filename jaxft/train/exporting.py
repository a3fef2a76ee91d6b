"""Export a trained run: restore its trainable tree and write hf | peft | bnb-nf4.

``hf`` merges adapters into the base in fp32 (an NF4 base is dequantized; the result is 16-bit,
never silently re-quantized) and reports the merge's max abs logit error against the unmerged
forward. ``bnb-nf4`` quantizes the merged weights on request (that is the format asked for).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import Config, load_config
from jaxft.errors import ConfigError, JaxftError
from jaxft.models import forward
from jaxft.peft import lora_merge
from jaxft.train import setup
from jaxft.train.checkpoint import RunCheckpoints
from jaxft.train.step import init_state


def restore_trained(run_dir: str | Path, which: str = "auto") -> tuple[Config, Any, Any, Any, int]:
    """``(cfg, model config, base params, trainable tree, step)`` of a run directory.

    ``which``: ``best`` (best validation checkpoint), ``latest``, a step number, or ``auto``
    (best when there is one, else latest).
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    config, params = setup.load_model(cfg)
    tx, _ = setup.make_tx(cfg)
    # Shapes only: no copy of the trainable tree (the whole model, for full fine-tuning) is made.
    abstract = jax.eval_shape(lambda p: init_state(
        setup.split_trainable(cfg, config, p, jax.random.PRNGKey(0))[0], tx, cfg.train.seed),
        params)
    ckpts = RunCheckpoints(run_dir, async_save=False)
    try:
        manager = ckpts.latest
        if which in ("best", "auto") and ckpts.best.latest_step() is not None:
            manager, step = ckpts.best, ckpts.best.latest_step()
        elif which == "best":
            raise JaxftError(f"{run_dir / 'best'}: no best checkpoint (no validation was run)")
        elif which in ("latest", "auto"):
            step = ckpts.latest_step()
        else:
            step = int(which)
        if step is None:
            raise JaxftError(f"{run_dir / 'checkpoints'}: no checkpoint to export")
        state, _, _ = ckpts.restore(step, abstract, manager)
    finally:
        ckpts.close()
    return cfg, config, params, state["trainable"], step


def export_run(run_dir: str | Path, fmt: str, out: str | Path, which: str = "auto",
               verbose: bool = True) -> Path:
    """Write the run's result in ``fmt`` to ``out``; returns ``out``."""
    from jaxft.export import save_bnb_nf4, save_hf, save_peft

    cfg, config, params, trainable, step = restore_trained(run_dir, which)
    out = Path(out)
    lora = trainable if cfg.train.method == "lora" else None
    dtype = cfg.export.dtype
    max_shard = int(cfg.export.max_shard_gb * 2**30)
    if fmt == "peft":
        if lora is None:
            raise ConfigError("--format peft needs a LoRA run (train.method=lora)")
        save_peft(out, config, lora, base_model_name_or_path=cfg.model.path)
    elif fmt in ("hf", "bnb-nf4"):
        merged = trainable if lora is None else lora_merge(config, params, lora, "float32")
        if lora is not None and verbose:
            print(f"merge max abs logit error vs unmerged forward: "
                  f"{merge_error(config, params, lora, merged):.2e}")
        merged_cfg = config.replace(param_dtype="float32")
        if fmt == "hf":
            save_hf(out, merged_cfg, merged, dtype=dtype, source_dir=cfg.model.path,
                    max_shard_bytes=max_shard)
        else:
            save_bnb_nf4(out, merged_cfg, merged, dtype=dtype, source_dir=cfg.model.path)
    elif fmt == "gguf":
        raise ConfigError("gguf export is not available yet (formats: hf, peft, bnb-nf4)")
    else:
        raise ConfigError(f"unknown export format {fmt!r} (hf, peft, bnb-nf4)")
    (out / "jaxft_export.json").write_text(json.dumps(
        {"run_dir": str(run_dir), "step": step, "format": fmt}, indent=2))
    return out


def merge_error(config: Any, params: Any, lora: Any, merged: Any, seq: int = 32) -> float:
    """Max abs logit difference between the merged model and base + adapter on random tokens."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, seq)),
                         jnp.int32)
    fp32 = config.replace(dtype="float32")
    a = forward(fp32, params, tokens, lora=lora)
    b = forward(fp32.replace(param_dtype="float32"), merged, tokens)
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
