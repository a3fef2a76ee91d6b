"""The train step: exact accumulation, adapter-only updates, one compilation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.models import LlamaConfig, init_params
from jaxft.peft import LoraSpec, lora_init
from jaxft.train.step import init_state, make_step, sft_loss_fn

CFG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def _batch(rows: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of different trained lengths (padding after each example), as the packer emits."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (rows, seq)).astype(np.int32)
    lengths = rng.integers(3, seq + 1, rows)
    seg = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    mask = seg.copy()
    mask[np.arange(rows), lengths - 1] = 0  # last token of an example predicts nothing
    mask[:, :2] = 0  # a prompt that is not trained
    pos = np.where(seg > 0, np.arange(seq)[None], 0).astype(np.int32)
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg,
            "positions": pos}


def _setup(method: str):
    params = init_params(CFG, jax.random.key(0))
    if method == "lora":
        lora = lora_init(jax.random.key(1), CFG, params, LoraSpec(r=4, alpha=8))
        lora = jax.tree.map(lambda x: x + 0.05, lora)  # non-zero B so both factors get gradients
        return lora, params
    return params, {}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_accumulation_is_exact(method):
    trainable, frozen = _setup(method)
    tx = optax.sgd(1.0)
    step = jax.jit(make_step(sft_loss_fn(CFG, method), tx))
    batch = _batch(8, 16)
    one_by_8 = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)  # [1, 8, S]
    eight_by_1 = jax.tree.map(lambda x: jnp.asarray(x)[:, None], batch)  # [8, 1, S]
    s1, m1 = step(init_state(trainable, tx, 0), frozen, one_by_8)
    s8, m8 = step(init_state(trainable, tx, 0), frozen, eight_by_1)
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-6)
    assert float(m1["tokens"]) == float(m8["tokens"]) == float(batch["loss_mask"].sum())
    # The update (SGD, lr 1: minus the gradient) agrees to fp32 rounding, relative to its norm.
    def update(s):
        return np.concatenate([np.asarray(a - b).ravel() for a, b in
                               zip(jax.tree.leaves(s["trainable"]), jax.tree.leaves(trainable))])

    u1, u8 = update(s1), update(s8)
    assert np.linalg.norm(u1 - u8) <= 1e-6 * np.linalg.norm(u1)

    # The per-micro-batch mean averaged over micro-batches (the old transformers bug) differs.
    loss_fn = sft_loss_fn(CFG, method)
    means = []
    for i in range(8):
        total, aux = loss_fn(trainable, frozen, jax.tree.map(lambda x: jnp.asarray(x)[i:i + 1],
                                                             batch), None)
        means.append(float(total / aux["tokens"]))
    # (1e-4 is ~200x the fp32 disagreement of the exact paths above.)
    assert abs(np.mean(means) - float(m8["loss"])) > 1e-4


def test_lora_step_leaves_base_untouched_and_compiles_once():
    trainable, frozen = _setup("lora")
    before = jax.tree.map(np.array, frozen)
    tx = optax.adamw(1e-2)
    step = make_step(sft_loss_fn(CFG, "lora"), tx)
    traced = chex.assert_max_traces(step, n=1)
    jitted = jax.jit(traced, donate_argnums=(0,))
    state = init_state(trainable, tx, 0)
    losses = []
    for i in range(4):
        batch = jax.tree.map(lambda x: jnp.asarray(x)[None], _batch(4, 16, seed=0))
        state, metrics = jitted(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_nonfinite_step_keeps_state():
    trainable, frozen = _setup("lora")
    tx = optax.adamw(1e-2)
    step = jax.jit(make_step(sft_loss_fn(CFG, "lora"), tx))
    state = init_state(trainable, tx, 0)
    bad = jax.tree.map(lambda x: jnp.asarray(x)[None], _batch(2, 8))
    poisoned = jax.tree.map(lambda x: x, frozen)
    poisoned["norm"] = frozen["norm"].at[0].set(jnp.nan)
    new, metrics = step(state, poisoned, bad)
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(state["trainable"]), jax.tree.leaves(new["trainable"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
