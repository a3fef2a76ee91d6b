"""Every YAML in configs/ builds its abstract params, train state and shardings (no memory)."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec

from jaxft.config import load_config
from jaxft.train import setup
from jaxft.train.plan import plan
from jaxft.train.sharding import tree_specs

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted((REPO / "configs").glob("*.yaml"))
BASE_PARAMS = {"llama-3-8b": 8_030_261_248, "llama-3.1-8b": 8_030_261_248,
               "llama-3.2-1b": 1_235_814_400}


def test_there_are_configs():
    assert len(YAMLS) >= 4


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_config_builds_abstract_state_and_shardings(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    config, frozen, state = setup.abstract_trees(cfg)
    devices = 32 if "pod" in path.stem else 8
    mesh = setup.mesh_shape(cfg, devices)
    rules = dict(cfg.mesh.rules)
    for tree in (frozen, state["trainable"]):
        specs = tree_specs(tree, rules, mesh)
        leaves = jax.tree.leaves(tree)
        spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        assert len(leaves) == len(spec_leaves)
        for leaf, spec in zip(leaves, spec_leaves):
            assert len(spec) <= leaf.ndim
    report = plan(cfg, devices)
    arch = Path(cfg.model.config).stem
    if arch in BASE_PARAMS:
        assert report.base_params == BASE_PARAMS[arch]
    assert report.trainable_params > 0
    if cfg.train.method == "lora":
        assert report.trainable_params < report.base_params / 50
    if cfg.quant.base == "nf4":  # 4.127 bits per quantized parameter, embeddings stay 16-bit
        assert report.base_bytes_per_device * devices < report.base_params * 2 * 0.45


def test_qlora_8b_plan_figures(monkeypatch):
    """Llama-3-8B QLoRA r=16 on all linears: 41.9M adapter params, base ~5.5 GB on one device."""
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "llama3-8b-qlora.yaml")
    report = plan(cfg, 1)
    assert report.trainable_params == 41_943_040
    assert 5.0 < report.base_bytes_per_device / 2**30 < 6.0
