"""Building the pieces of a run from its config: model, trainable tree, optimizer, shardings.

Kept apart from the loop so that ``jaxft plan``, the config tests (``jax.eval_shape`` on every
YAML in ``configs/``) and the loop build exactly the same things.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.config import Config
from jaxft.models import LlamaConfig, abstract_params, architecture, load_hf
from jaxft.peft import LoraSpec, lora_init
from jaxft.quant.nf4 import nf4_quantize
from jaxft.train.optim import lr_schedule, make_optimizer, warmup_steps_for
from jaxft.train.sharding import optimizer_shardings, tree_shardings
from jaxft.train.step import init_state


def lora_spec(cfg: Config) -> LoraSpec:
    lo = cfg.lora
    return LoraSpec(
        r=lo.r, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets), rslora=lo.rslora,
        use_dora=lo.use_dora,
        rank_pattern={k: v.r for k, v in lo.overrides.items() if v.r is not None},
        alpha_pattern={k: v.alpha for k, v in lo.overrides.items() if v.alpha is not None},
    )


def runtime_kwargs(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return dict(dtype=m.compute_dtype or m.dtype, param_dtype=m.dtype, scan_layers=m.scan_layers,
                remat=m.remat)


def load_model(cfg: Config) -> tuple[LlamaConfig, Any]:
    if cfg.model.path is None:
        from jaxft.errors import ConfigError

        raise ConfigError("model.path is not set: point it at a Hugging Face checkpoint directory")
    if cfg.quant.base == "nf4" and cfg.train.method == "full":
        from jaxft.errors import ConfigError

        raise ConfigError("quant.base=nf4 needs train.method=lora (QLoRA): an NF4 base is frozen")
    m = cfg.model
    return load_hf(m.path, dtype=m.dtype, compute_dtype=m.compute_dtype,
                   scan_layers=m.scan_layers, remat=m.remat,
                   quant=None if cfg.quant.base == "none" else cfg.quant.base,
                   block_size=cfg.quant.block_size, double_quant=cfg.quant.double_quant)


def split_trainable(cfg: Config, config: LlamaConfig, params: Any, rng: jax.Array) -> tuple[Any, Any]:
    """``(trainable, frozen)``: the adapter tree and the base, or fp32 params and nothing."""
    if cfg.train.method == "lora":
        return lora_init(rng, config, params, lora_spec(cfg), jnp.float32), params
    return jax.tree.map(lambda x: x.astype(jnp.float32), params), {}


def make_tx(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    warmup = warmup_steps_for(cfg.train.steps, o.warmup_ratio, o.warmup_steps)
    schedule = lr_schedule(o.lr, cfg.train.steps, warmup, o.final_lr_ratio, o.schedule)
    tx = make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                        clip_norm=o.clip_norm)
    return tx, schedule


def state_shardings(state: Any, mesh: Mesh, rules: dict) -> Any:
    trainable_sh = tree_shardings(state["trainable"], rules, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        "step": replicated,
        "trainable": trainable_sh,
        "opt_state": optimizer_shardings(state["opt_state"], trainable_sh, mesh),
        "rng": replicated,
    }


def abstract_trees(cfg: Config) -> tuple[LlamaConfig, Any, Any]:
    """``(architecture, frozen params, train state)`` as ``jax.ShapeDtypeStruct`` trees.

    Built with ``jax.eval_shape``: a 70B config costs no memory. The base goes through the same
    NF4 quantization and adapter creation as a real run.
    """
    config = architecture(cfg.model.path, cfg.model.config, **runtime_kwargs(cfg))
    tx, _ = make_tx(cfg)

    def build() -> tuple[Any, Any]:
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(config))
        if cfg.quant.base == "nf4":
            params = _quantize_tree(params, cfg.quant.block_size, cfg.quant.double_quant)
        trainable, frozen = split_trainable(cfg, config, params, jax.random.key(0))
        return frozen, init_state(trainable, tx, cfg.train.seed)

    frozen, state = jax.eval_shape(build)
    return config, frozen, state


def mesh_shape(cfg: Config, num_devices: int) -> dict[str, int]:
    """The mesh axis sizes a run of ``cfg`` would use on ``num_devices`` devices."""
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    known = 1
    for v in sizes.values():
        known *= v if v != -1 else 1
    return {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}


def _quantize_tree(params: Any, block_size: int, double_quant: bool) -> Any:
    """NF4-quantize every decoder linear kernel (as ``load_hf(quant='nf4')`` does)."""

    def one(path: tuple, x: Any) -> Any:
        names = [getattr(k, "key", "") for k in path]
        if names[-1] == "kernel" and names[0].startswith("layers"):
            quant = jax.vmap(lambda w: nf4_quantize(w.T, block_size=block_size,
                                                    double_quant=double_quant))
            return quant(x) if names[0] == "layers" else nf4_quantize(
                x.T, block_size=block_size, double_quant=double_quant)
        return x

    return jax.tree_util.tree_map_with_path(one, params)


def base_fingerprint(path: str | None) -> str | None:
    """sha256 of the base checkpoint's config.json and weight index/header sizes."""
    if path is None:
        return None
    root = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (root / name).is_file():
            h.update((root / name).read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()


def build_data(cfg: Config, tokenizer: Any) -> tuple[Any, Any, int | None]:
    """Train/validation iterators and, for preference objectives, examples per micro-batch."""
    from jaxft.data import build_iterators, build_preference_iterators

    kw = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    if cfg.train.objective == "sft":
        return (*build_iterators(cfg.data, tokenizer, **kw), None)
    pairs = cfg.data.batch_size // cfg.train.grad_accum
    kind = "kto" if cfg.train.objective == "kto" else "pairs"
    train_it, val_it = build_preference_iterators(cfg.data, tokenizer, objective=kind,
                                                  batch_pairs=pairs, **kw)
    return train_it, val_it, 2 * pairs
