"""Sharding as data: logical axis names per parameter, a rule table from config, a mesh.

Every parameter path gets logical axis names (``param_logical_axes``); the config's rule table
maps a logical name to a mesh axis of ``('data', 'fsdp', 'tensor')`` (or ``None``: replicated).
A dimension that the mesh axis does not divide is replicated rather than failing, and a mesh axis
is used at most once per array. The batch is split over ``data x fsdp``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Mapping[str, str | Sequence[str] | None]

# Logical axes of a linear kernel [in, out] by module name.
_LINEAR_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh over all devices; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are "
                              f"not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                          f"{len(devices)} are available")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def _names(path: tuple[Any, ...]) -> list[str]:
    out = []
    for k in path:
        name = getattr(k, "key", None)
        if name is None:
            name = getattr(k, "name", None)
        if name is None:
            name = str(getattr(k, "idx", k))
        out.append(str(name))
    return out


def logical_axes(path: tuple[Any, ...], leaf: Any) -> tuple[str | None, ...]:
    """Logical axis names of one leaf of a params / lora / NF4 tree (by its path and rank)."""
    names = _names(path)
    ndim = len(getattr(leaf, "shape", ()))
    stacked = bool(names) and names[0] == "layers"
    lead: tuple[str | None, ...] = ("layers",) if stacked else ()
    module = next((n for n in reversed(names) if n in _LINEAR_AXES), None)
    last = names[-1] if names else ""
    if names and names[0] == "embed_tokens":
        axes: tuple[str | None, ...] = ("vocab", "embed")
    elif module is not None:
        in_ax, out_ax = _LINEAR_AXES[module]
        if last == "kernel":
            axes = lead + (in_ax, out_ax)
        elif last == "bias":
            axes = lead + (out_ax,)
        elif last == "codes":  # NF4 packed codes [.., n/2]
            axes = lead + ("nf4_packed",)
        elif last == "absmax":
            axes = lead + ("nf4_blocks",)
        elif last in ("nested_absmax", "offset"):
            axes = lead + (None,) * (ndim - len(lead))
        elif last == "a":  # LoRA A [.., in, r]
            axes = lead + (in_ax, "lora_rank")
        elif last == "b":  # LoRA B [.., r, out]
            axes = lead + ("lora_rank", out_ax)
        elif last == "m":  # DoRA magnitude [.., out]
            axes = lead + (out_ax,)
        else:
            axes = (None,) * ndim
    else:  # norms and anything else: small, replicated except the layer axis
        axes = lead + (None,) * (ndim - len(lead))
    if len(axes) != ndim:
        axes = (None,) * ndim
    return axes


def spec_for(shape: Sequence[int], axes: Sequence[str | None], rules: Rules,
             mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec for ``shape`` with logical ``axes``; indivisible or reused axes replicate."""
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in zip(shape, axes):
        target = rules.get(name) if name is not None else None
        mesh_axes = [target] if isinstance(target, str) else list(target or [])
        unknown = [a for a in mesh_axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(f"mesh.rules maps {name!r} to {unknown}; mesh axes are {MESH_AXES}")
        mesh_axes = [a for a in mesh_axes if a not in used and mesh_shape[a] > 1]
        size = math.prod(mesh_shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*out)


def tree_specs(tree: Any, rules: Rules, mesh_shape: Mapping[str, int]) -> Any:
    """PartitionSpec for every leaf of a (possibly abstract) params / lora / NF4 tree."""

    def one(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        return spec_for(getattr(leaf, "shape", ()), logical_axes(path, leaf), rules, mesh_shape)

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a (possibly abstract) params / lora tree."""
    specs = tree_specs(tree, rules, dict(mesh.shape))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def optimizer_shardings(opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shard optimizer moments like the parameters they follow; scalars are replicated.

    A leaf of the optimizer state whose key path ends with a parameter's key path (optax states
    hold trees shaped like the parameters) takes that parameter's sharding.
    """
    by_path = {
        tuple(_names(p)): s
        for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = tuple(_names(path))
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and len(hit.spec) <= len(getattr(leaf, "shape", ())):
                return hit
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Rows split over the ``batch`` rule's mesh axes (``data x fsdp`` by default)."""
    target = rules.get("batch", ("data", "fsdp"))
    axes = [target] if isinstance(target, str) else list(target or [])
    spec: list[Any] = [None] * ndim
    spec[batch_axis] = tuple(axes) if axes else None
    return NamedSharding(mesh, PartitionSpec(*spec))
