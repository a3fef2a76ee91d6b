"""An NF4 base tree goes through jit, sharding and an orbax checkpoint unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxft.models import LlamaConfig, forward, init_params
from jaxft.peft import combine_variables, split_variables
from jaxft.quant.nf4 import NF4Weight, nf4_quantize
from jaxft.train.setup import _quantize_tree

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)


def test_nf4_tree_checkpoints_with_orbax_and_runs_jitted(tmp_path):
    params = _quantize_tree(init_params(CFG, jax.random.key(0)), 64, True)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, NF4Weight) and q.codes.shape[0] == 2
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "nf4", params)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "nf4", jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    eager = forward(CFG, params, tokens)
    jitted = jax.jit(lambda p, t: forward(CFG, p, t))(restored, tokens)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-6)


def test_split_and_combine_variables():
    params = init_params(CFG, jax.random.key(0))
    base, lora = split_variables(combine_variables(params, {"x": 1}))
    assert base is params and lora == {"x": 1}
    assert split_variables(combine_variables(params, None))[1] is None
    assert nf4_quantize(jnp.ones((4, 64))).shape == (4, 64)
