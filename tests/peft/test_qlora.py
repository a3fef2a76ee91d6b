"""QLoRA: an NF4 base computes exactly what its dense dequantization computes, with or without LoRA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import forward, load_hf
from jaxft.peft import LoraSpec, LoraWeights, lora_init
from jaxft.quant import NF4Weight, nf4_dequantize

# fp32. The two forwards differ only in the base matmul's operand layout ([out, in] contracted on
# its last axis vs a dense [in, out] kernel), so they agree to rounding: measured 1.7e-6 (base),
# 2.4e-6 (LoRA), 1.8e-6 (DoRA) on logits of magnitude ~3.5. (With A also randomized at 0.3, as
# test_lora._randomize does, the adapter's gain amplifies rounding to 1.4e-5, the same as a random
# 1-ulp perturbation of the dense kernels gives: 1.3e-5.)
TOL = 1e-5


def _randomize_b(lora, seed: int = 0):
    """A trained-looking adapter: lora_init's A, and a random non-zero B."""
    leaves, tree = jax.tree.flatten(lora, is_leaf=lambda x: isinstance(x, LoraWeights))
    key = jax.random.key(seed)
    return jax.tree.unflatten(tree, [
        ad.replace(b=0.3 * jax.random.normal(jax.random.fold_in(key, i), ad.b.shape))
        for i, ad in enumerate(leaves)
    ])


def _dense(params):
    """Every NF4 kernel replaced by its fp32 dequantization as a dense ``[in, out]`` kernel."""
    return jax.tree.map(
        lambda x: jnp.swapaxes(nf4_dequantize(x, jnp.float32), -1, -2)
        if isinstance(x, NF4Weight) else x,
        params, is_leaf=lambda x: isinstance(x, NF4Weight),
    )


@pytest.mark.parametrize("scan_layers", [True, False])
def test_nf4_forward_equals_dequantized_dense_forward(hf_model_factory, scan_layers):
    path, _ = hf_model_factory("qwen2")  # biases, and an intermediate size (96) not a block multiple
    config, params = load_hf(path, quant="nf4", scan_layers=scan_layers)
    dense = jax.jit(_dense)(params)
    kernels = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, NF4Weight))
               if isinstance(x, NF4Weight)]
    assert len(kernels) == 7 * (1 if scan_layers else config.num_layers)
    tokens = jnp.asarray(
        np.random.default_rng(0).integers(0, config.vocab_size, (2, 24)), jnp.int32
    )
    base = np.asarray(forward(config, params, tokens))
    np.testing.assert_allclose(base, np.asarray(forward(config, dense, tokens)), rtol=0, atol=TOL)
    for spec in (LoraSpec(r=8, alpha=16), LoraSpec(r=4, alpha=8, use_dora=True)):
        lora = _randomize_b(lora_init(jax.random.key(1), config, params, spec))
        got = np.asarray(forward(config, params, tokens, lora=lora))
        want = np.asarray(forward(config, dense, tokens, lora=lora))
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
        assert np.abs(got - base).max() > 1e-2  # the adapter matters
