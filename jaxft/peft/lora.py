"""LoRA / DoRA adapters as a separate parameter tree: creation, merge, counting.

The adapter tree mirrors the paths of the layers it adapts
(``{'layers': {'self_attn': {'q_proj': {'adapter': LoraWeights}}}}``; unrolled layers use
``layers_0`` ...), so ``apply({'params': base, 'lora': adapters}, ...)`` is the whole story and
``jax.grad`` is taken with respect to the adapter tree alone.
Reference: peft/tuners/lora/layer.py (``update_layer``, ``reset_lora_parameters``,
``get_delta_weight``) and variants.py (DoRA).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError
from jaxft.models.config import LlamaConfig
from jaxft.models.hf_keys import LINEAR_MODULES, KeyEntry, get_path, key_table, set_path
from jaxft.nn.linear import base_kernel
from jaxft.nn.lora import LoraWeights

Params = dict[str, Any]


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how (PEFT ``LoraConfig`` semantics).

    ``targets``: module names (``q_proj``) or regexes fully matching the module's path inside a
    decoder layer (``self_attn\\..*``). ``rank_pattern`` / ``alpha_pattern``: per-module overrides
    keyed by a regex searched as PEFT does (``(.*\\.)?KEY$`` against the HF module path).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LINEAR_MODULES
    rslora: bool = False
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")
        unknown = [t for t in self.targets if not _matches_any(t)]
        if unknown:
            raise ConfigError(
                f"lora.targets {unknown} match no linear layer; valid: {list(LINEAR_MODULES)}"
            )

    def selects(self, module_path: str) -> bool:
        """``module_path`` is the path inside a layer, e.g. ``self_attn.q_proj``."""
        name = module_path.rsplit(".", 1)[-1]
        return any(t == name or re.fullmatch(t, module_path) for t in self.targets)

    def rank_alpha(self, hf_module: str) -> tuple[int, float]:
        return (int(pattern_value(self.rank_pattern, hf_module, self.r)),
                float(pattern_value(self.alpha_pattern, hf_module, self.alpha)))


def pattern_value(patterns: Mapping[str, Any], hf_module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end
    of the module's dotted name, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", hf_module):
            return value
    return default


def _module_path(entry: KeyEntry) -> str:
    return ".".join(entry.path[:-1])  # e.g. self_attn.q_proj


def _matches_any(target: str) -> bool:
    paths = [f"{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}"
             for m in LINEAR_MODULES]
    return any(target == p.rsplit(".", 1)[-1] or re.fullmatch(target, p) for p in paths)


def adapted_entries(config: LlamaConfig, spec: LoraSpec) -> list[KeyEntry]:
    """Key-table entries of the linear weights ``spec`` adapts (every layer)."""
    return [e for e in key_table(config) if e.is_linear_weight and spec.selects(_module_path(e))]


def lora_init(
    rng: jax.Array, config: LlamaConfig, params: Params, spec: LoraSpec,
    dtype: jnp.dtype = jnp.float32,
) -> Params:
    """A fresh adapter tree: A Kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(in)), B zeros, so the
    adapter starts as an exact no-op; DoRA's magnitude starts at ``||W||`` per output row."""
    lora: Params = {}
    groups: dict[tuple[str, ...], list[KeyEntry]] = {}
    for e in adapted_entries(config, spec):
        groups.setdefault(e.param_path(config.scan_layers), []).append(e)
    for i, (path, entries) in enumerate(sorted(groups.items())):
        kernel = get_path(params, path)
        r, alpha = spec.rank_alpha(entries[0].module)
        if config.scan_layers and any(spec.rank_alpha(e.module) != (r, alpha) for e in entries):
            raise ConfigError(
                f"rank/alpha patterns give different values across layers for {'/'.join(path)}; "
                "stacked (scanned) layers share one rank: set model.scan_layers=false"
            )
        in_f, out_f = _kernel_in_out(kernel)
        lead = (config.num_layers,) if config.scan_layers else ()
        bound = 1.0 / (in_f**0.5)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, in_f, r), dtype, -bound, bound)
        b = jnp.zeros((*lead, r, out_f), dtype)
        m = None
        if spec.use_dora:
            m = _row_norm(kernel, config.scan_layers).astype(dtype)
        adapter = LoraWeights(a, b, m, alpha=float(alpha), rslora=spec.rslora,
                              dropout=float(spec.dropout))
        set_path(lora, (*path[:-1], "adapter"), adapter)
    if not lora:
        raise ConfigError(f"lora.targets {list(spec.targets)} selected no layer of the model")
    return lora


def _kernel_in_out(kernel: Any) -> tuple[int, int]:
    shape = getattr(kernel, "shape", None)
    if hasattr(kernel, "codes"):  # NF4Weight: static per-matrix shape [out, in]
        out_f, in_f = kernel.shape
        return in_f, out_f
    return shape[-2], shape[-1]


def _row_norm(kernel: Any, stacked: bool) -> jax.Array:
    def one(k: Any) -> jax.Array:
        return jnp.linalg.norm(base_kernel(k, jnp.float32), axis=0)

    return jax.vmap(one)(kernel) if stacked else one(kernel)


def iter_adapters(lora: Params, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], LoraWeights]]:
    """``(path of the adapted layer, adapter)`` for every adapter in the tree."""
    for k, v in lora.items():
        if isinstance(v, LoraWeights):
            yield prefix, v
        else:
            yield from iter_adapters(v, (*prefix, k))


def lora_merge(config: LlamaConfig, params: Params, lora: Params, dtype: str | None = None) -> Params:
    """Base params with every adapter merged: ``W' = W + s A B`` (JAX layout) in fp32.

    DoRA: ``W' = (m / ||W + sAB||_row) * (W + sAB)``. An NF4 base is dequantized and the result is
    dense (never re-quantized silently). The result is in ``dtype`` (default: param dtype).
    """
    out_dtype = jnp.dtype(dtype or config.param_dtype)
    merged = jax.tree.map(lambda x: x, params, is_leaf=lambda x: hasattr(x, "codes"))

    def merge_one(kernel: Any, adapter: LoraWeights) -> jax.Array:
        w = base_kernel(kernel, jnp.float32)
        w_new = w + adapter.delta()
        if adapter.m is not None:
            norm = jnp.linalg.norm(w_new, axis=0)
            w_new = w_new * (adapter.m.astype(jnp.float32) / norm)[None, :]
        return w_new.astype(out_dtype)

    for path, adapter in iter_adapters(lora):
        kernel = get_path(params, (*path, "kernel"))
        if config.scan_layers:
            value = jax.vmap(merge_one)(kernel, adapter)
        else:
            value = merge_one(kernel, adapter)
        set_path(merged, (*path, "kernel"), value)
    return merged


def count_lora_params(lora: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(lora))


__all__ = [
    "LoraSpec",
    "combine_variables",
    "split_variables",
    "LoraWeights",
    "adapted_entries",
    "count_lora_params",
    "iter_adapters",
    "lora_init",
    "lora_merge",
]


def split_variables(variables: Params) -> tuple[Params, Params | None]:
    """``{'params': base, 'lora': adapters}`` -> ``(base, adapters)`` (adapters may be absent)."""
    return variables["params"], variables.get("lora")


def combine_variables(params: Params, lora: Params | None) -> Params:
    """The variables dict that ``Transformer.apply`` takes: the inverse of ``split_variables``."""
    return {"params": params} if lora is None else {"params": params, "lora": lora}
