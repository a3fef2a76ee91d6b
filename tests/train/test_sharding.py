"""Sharding rules (golden table), and sharded / multi-process runs equal to one device."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxft.config import MeshSection
from jaxft.models import LlamaConfig, abstract_params
from jaxft.peft import LoraSpec, lora_init
from jaxft.quant.nf4 import nf4_quantize
from jaxft.train.metrics import read_metrics
from jaxft.train.sharding import tree_specs

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_run_inputs, write_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RULES = MeshSection().rules
CFG = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)


def _flat(specs) -> dict[str, P]:
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): s
            for path, s in flat}


def _abstract_trees():
    def build():
        params = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), abstract_params(CFG))
        lora = lora_init(jax.random.key(0), CFG, params, LoraSpec(r=8, alpha=16))
        q = jax.vmap(lambda w: nf4_quantize(w.T))(params["layers"]["self_attn"]["q_proj"]["kernel"])
        return params, lora, q

    return jax.eval_shape(build)


GOLDEN_2x2x2 = {
    "embed_tokens": P("tensor", "fsdp"),
    "layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/self_attn/k_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/self_attn/o_proj/kernel": P(None, "tensor", "fsdp"),
    "layers/mlp/gate_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
    "layers/input_layernorm/scale": P(None, None),
    "norm": P(None),
    "lm_head/kernel": P("fsdp", "tensor"),
}
GOLDEN_FSDP8 = {
    "embed_tokens": P(None, "fsdp"),
    "layers/self_attn/q_proj/kernel": P(None, "fsdp", None),
    "layers/self_attn/o_proj/kernel": P(None, None, "fsdp"),
    "layers/mlp/down_proj/kernel": P(None, None, "fsdp"),
    "lm_head/kernel": P("fsdp", None),
}


@pytest.mark.parametrize("mesh,golden", [({"data": 2, "fsdp": 2, "tensor": 2}, GOLDEN_2x2x2),
                                         ({"data": 1, "fsdp": 8, "tensor": 1}, GOLDEN_FSDP8)])
def test_param_shardings_follow_rules(mesh, golden):
    params, lora, q = _abstract_trees()
    specs = _flat(tree_specs(params, RULES, mesh))
    for path, spec in golden.items():
        assert specs[path] == spec, path
    lora_specs = _flat(tree_specs(lora, RULES, mesh))
    tensor = "tensor" if mesh["tensor"] > 1 else None
    assert lora_specs["layers/self_attn/q_proj/adapter/a"] == P(None, "fsdp", None)
    assert lora_specs["layers/self_attn/q_proj/adapter/b"] == P(None, None, tensor)
    assert lora_specs["layers/mlp/down_proj/adapter/a"] == P(None, tensor, None)
    assert lora_specs["layers/mlp/down_proj/adapter/b"] == P(None, None, "fsdp")
    nf4 = _flat(tree_specs({"layers": {"self_attn": {"q_proj": {"kernel": q}}}}, RULES, mesh))
    assert nf4["layers/self_attn/q_proj/kernel/codes"] == P(None, "fsdp")
    assert nf4["layers/self_attn/q_proj/kernel/absmax"] == P(None, "fsdp")
    assert nf4["layers/self_attn/q_proj/kernel/offset"] == P(None)


def test_optimizer_state_follows_params():
    import optax

    from jaxft.train.setup import state_shardings
    from jaxft.train.sharding import make_mesh
    from jaxft.train.step import init_state

    _, lora, _ = _abstract_trees()
    state = jax.eval_shape(lambda t: init_state(t, optax.adamw(1e-3), 0), lora)
    mesh = make_mesh(1, 1, 1)
    sh = state_shardings(state, mesh, {**RULES})
    mu = sh["opt_state"][0].mu["layers"]["self_attn"]["q_proj"]["adapter"].a
    assert mu == sh["trainable"]["layers"]["self_attn"]["q_proj"]["adapter"].a


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("sharded"), rows=16)


def _run(root: Path, inputs, devices: int, *overrides: str, processes: int = 1) -> list[float]:
    config = write_config(root, inputs)
    common = ["train.steps=5", "data.batch_size=8", "data.pack=false", "lora.dropout=0.0",
              *overrides]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxft", "train", str(config), *common, "--no-progress"]
    if processes == 1:
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                         str(processes), "--process-id", str(i)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for i in range(processes)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
    records = read_metrics(root / "run" / "metrics.jsonl")
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def single_device_losses(run_inputs, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), run_inputs, 1)


@pytest.mark.parametrize("mesh", [("2", "2", "2"), ("1", "8", "1")])
def test_sharded_equals_single_device(run_inputs, single_device_losses, tmp_path, mesh):
    d, f, t = mesh
    losses = _run(tmp_path, run_inputs, 8, f"mesh.data={d}", f"mesh.fsdp={f}",
                  f"mesh.tensor={t}")
    assert len(losses) == 5
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)


def test_two_processes_equal_single_process(run_inputs, single_device_losses, tmp_path):
    losses = _run(tmp_path, run_inputs, 2, "mesh.fsdp=-1", processes=2)
    assert len(losses) == 5
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
