"""The PEFT adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.`` + the HF module path + ``.lora_A.weight`` ``[r, in]`` /
``.lora_B.weight`` ``[out, r]`` (and ``.lora_magnitude_vector`` ``[out]`` for DoRA); the JAX
factors are their transposes (SPECS.md section 2). The same key table as the model's import and
export names the modules, so the formats cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxft.errors import CheckpointError
from jaxft.models.config import LlamaConfig
from jaxft.models.hf import np_dtype
from jaxft.models.hf_keys import LINEAR_MODULES, key_table, set_path
from jaxft.models.safetensors_io import SafetensorsFile, save_file
from jaxft.nn.lora import LoraWeights
from jaxft.peft.lora import Params, iter_adapters, pattern_value

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _adapters_by_module(config: LlamaConfig, lora: Params) -> list[tuple[str, int, LoraWeights]]:
    """``(HF module path, layer, adapter of that layer)`` for every adapted module."""
    adapters = dict(iter_adapters(lora))
    rows = []
    for e in key_table(config):
        if not e.is_linear_weight:
            continue
        path = e.param_path(config.scan_layers)[:-1]
        if path in adapters:
            rows.append((e.module, e.layer, adapters[path]))
    return rows


def save_peft(
    out_dir: str | Path,
    config: LlamaConfig,
    lora: Params,
    *,
    base_model_name_or_path: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a PEFT LoRA/DoRA adapter that ``PeftModel.from_pretrained`` and vLLM load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npdt = np_dtype(dtype)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    kinds = set()
    for module, layer, ad in _adapters_by_module(config, lora):
        pick = (lambda x: x[layer]) if config.scan_layers else (lambda x: x)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.asarray(pick(ad.a)).T.astype(npdt)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.asarray(pick(ad.b)).T.astype(npdt)
        if ad.m is not None:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = np.asarray(pick(ad.m)).astype(npdt)
        name = module.rsplit(".", 1)[-1]
        ranks[name], alphas[name] = ad.rank, ad.alpha
        kinds.add((ad.rslora, ad.m is not None, ad.dropout))
    if not tensors:
        raise CheckpointError("the adapter tree is empty: nothing to export")
    if len(kinds) > 1:
        raise CheckpointError("adapters mix rsLoRA/DoRA/dropout settings; PEFT needs one setting")
    rslora, dora, dropout = kinds.pop()
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks, key=LINEAR_MODULES.index),
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "use_dora": dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    save_file(tensors, out / ADAPTER_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out


def load_peft(adapter_dir: str | Path, config: LlamaConfig, dtype: str = "float32") -> Params:
    """Read a PEFT LoRA/DoRA adapter into an adapter tree for ``config``'s layout."""
    root = Path(adapter_dir)
    cfg_path, weights_path = root / CONFIG_FILE, root / ADAPTER_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            hint = " (adapter_model.bin is refused: safetensors only)" if (
                root / "adapter_model.bin").is_file() else ""
            raise CheckpointError(f"{p}: not found{hint}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (need {ok!r})")
    if cfg.get("modules_to_save"):
        raise CheckpointError(f"{cfg_path}: modules_to_save={cfg['modules_to_save']} is not supported")
    f = SafetensorsFile(weights_path)
    names = set(f.keys())
    npdt = np_dtype(dtype)
    by_path: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    used: set[str] = set()
    for e in key_table(config):
        if not e.is_linear_weight:
            continue
        a_key = f"{PREFIX}{e.module}.lora_A.weight"
        if a_key not in names:
            continue
        b_key = f"{PREFIX}{e.module}.lora_B.weight"
        m_key = f"{PREFIX}{e.module}.lora_magnitude_vector"
        if b_key not in names:
            raise CheckpointError(f"{weights_path}: {a_key} has no matching {b_key}")
        a, b = np.asarray(f.get(a_key)).T.astype(npdt), np.asarray(f.get(b_key)).T.astype(npdt)
        m = np.asarray(f.get(m_key)).astype(npdt) if m_key in names else None
        used.update(k for k in (a_key, b_key, m_key) if k in names)
        name = e.module.rsplit(".", 1)[-1]
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, e.module, cfg.get("lora_alpha", 8)))
        by_path.setdefault(e.param_path(config.scan_layers)[:-1], []).append(
            {"a": a, "b": b, "m": m, "alpha": alpha, "layer": e.layer, "name": name})
    unexpected = sorted(names - used)
    if unexpected:
        raise CheckpointError(f"{weights_path}: tensors not matching any layer of the model: "
                              f"{unexpected[:5]}")
    if not by_path:
        raise CheckpointError(f"{weights_path}: no LoRA tensors found")
    lora: Params = {}
    for path, items in by_path.items():
        if config.scan_layers and len(items) != config.num_layers:
            raise CheckpointError(
                f"{weights_path}: {items[0]['name']} is adapted on {len(items)} of "
                f"{config.num_layers} layers; load it with model.scan_layers=false"
            )
        if len({(it["a"].shape, it["alpha"]) for it in items}) > 1:
            raise CheckpointError(f"{weights_path}: {items[0]['name']} has different ranks per "
                                  "layer; load it with model.scan_layers=false")
        stack = (lambda xs: jnp.asarray(np.stack(xs))) if config.scan_layers else (
            lambda xs: jnp.asarray(xs[0]))
        m = None if items[0]["m"] is None else stack([it["m"] for it in items])
        ad = LoraWeights(stack([it["a"] for it in items]), stack([it["b"] for it in items]), m,
                         alpha=items[0]["alpha"], rslora=bool(cfg.get("use_rslora", False)),
                         dropout=float(cfg.get("lora_dropout", 0.0)))
        set_path(lora, (*path, "adapter"), ad)
    return lora

