"""``jaxft plan``: memory and throughput estimate of a run before it starts (no weights needed).

Memory per device comes from the abstract trees (``jax.eval_shape``) and the sharding rules:
each leaf's bytes divided by the number of devices its PartitionSpec splits it over. Activations
are an estimate (Korthikanti et al. 2022, 16-bit: ``S*B*H*(34 + 5*a*S/H)`` bytes per layer
without rematerialisation, ``2*S*B*H`` with full rematerialisation, the matmul outputs with the
``dots`` policy), plus fp32 logits and their gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jaxft.config import Config
from jaxft.models.config import LlamaConfig
from jaxft.nn.head import chunk_rows
from jaxft.train import setup
from jaxft.train.perf import flops_per_token
from jaxft.train.sharding import tree_specs


@dataclass
class PlanReport:
    config: LlamaConfig
    mesh: dict[str, int]
    base_params: int
    trainable_params: int
    base_bytes_per_device: float
    trainable_bytes_per_device: float
    optimizer_bytes_per_device: float
    activation_bytes_per_device: float
    flops_per_token: float

    @property
    def total_bytes_per_device(self) -> float:
        return (self.base_bytes_per_device + self.trainable_bytes_per_device
                + self.optimizer_bytes_per_device + self.activation_bytes_per_device)


def _per_device_bytes(tree: Any, specs: Any, mesh: dict[str, int]) -> float:
    total = 0.0
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for leaf, spec in zip(leaves, spec_leaves):
        split = 1
        for part in spec:
            for axis in (part if isinstance(part, tuple) else (part,)):
                if axis is not None:
                    split *= mesh[axis]
        total += leaf.size * leaf.dtype.itemsize / split
    return total


def plan(cfg: Config, num_devices: int) -> PlanReport:
    config, frozen, state = setup.abstract_trees(cfg)
    mesh = setup.mesh_shape(cfg, num_devices)
    rules = dict(cfg.mesh.rules)
    base_tree = frozen if cfg.train.method == "lora" else state["trainable"]
    base_params = sum(
        math.prod(x.batch_shape) * x.numel if hasattr(x, "codes") else x.size
        for x in jax.tree.leaves(base_tree, is_leaf=lambda x: hasattr(x, "codes"))
    )
    trainable = state["trainable"]
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    base_b = _per_device_bytes(frozen, tree_specs(frozen, rules, mesh), mesh)
    train_specs = tree_specs(trainable, rules, mesh)
    train_b = _per_device_bytes(trainable, train_specs, mesh)
    opt_b = 2 * train_b  # AdamW moments, sharded like the parameters
    if cfg.train.method == "full":
        # fp32 master weights are the trainable tree; 16-bit compute copies are transient.
        base_b = 0.0
    c = config
    batch_split = mesh["data"] * mesh["fsdp"]
    micro = max(cfg.data.batch_size // cfg.train.grad_accum // batch_split, 1)
    s, h, a = cfg.data.seq_len, c.hidden_size, c.num_heads
    if config.remat == "full":  # only each layer's input is kept
        per_layer = 2 * s * micro * h
    elif config.remat == "dots":  # outputs of the non-batched matmuls are kept (16-bit)
        kv = c.num_kv_heads * c.head_dim
        per_layer = 2 * s * micro * (c.num_heads * c.head_dim + 2 * kv + 2 * h
                                     + 3 * c.intermediate_size)
    else:
        per_layer = s * micro * h * (34 + 5 * a * s / h)
    act = c.num_layers * per_layer / max(mesh["tensor"], 1)
    # The output layer keeps no logits (jaxft.nn.head): one chunk of fp32 logits and its
    # probabilities exist at a time.
    act += chunk_rows(micro * s, c.vocab_size) * c.vocab_size * 4 * 2
    return PlanReport(config, mesh, int(base_params), int(n_train), base_b, train_b, opt_b,
                      act, flops_per_token(config, trainable, cfg.train.method, s))


def format_report(r: PlanReport) -> str:
    gib = 2.0**30
    rows = [
        ("architecture", f"{r.config.model_type}: {r.config.num_layers} layers, hidden "
                         f"{r.config.hidden_size}, {r.config.num_heads}/{r.config.num_kv_heads} "
                         f"heads, vocab {r.config.vocab_size}"),
        ("mesh", ", ".join(f"{k}={v}" for k, v in r.mesh.items())),
        ("base parameters", f"{r.base_params:,}"),
        ("trainable parameters", f"{r.trainable_params:,}"),
        ("base weights / device", f"{r.base_bytes_per_device / gib:.2f} GiB"),
        ("trainable / device", f"{r.trainable_bytes_per_device / gib:.2f} GiB"),
        ("optimizer / device", f"{r.optimizer_bytes_per_device / gib:.2f} GiB"),
        ("activations / device", f"{r.activation_bytes_per_device / gib:.2f} GiB (estimate)"),
        ("total / device", f"{r.total_bytes_per_device / gib:.2f} GiB"),
        ("FLOPs / trained token", f"{r.flops_per_token / 1e9:.2f} GFLOP"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
