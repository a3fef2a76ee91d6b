"""LoRA / rsLoRA / DoRA against peft: export, import, merge, and training invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxft.models import forward, load_hf, save_hf
from jaxft.models.safetensors_io import SafetensorsFile
from jaxft.peft import LoraSpec, LoraWeights, load_peft, lora_init, lora_merge, save_peft

SPECS = {
    "lora": LoraSpec(r=8, alpha=16),
    "rslora": LoraSpec(r=8, alpha=16, rslora=True, targets=("q_proj", "v_proj", "down_proj")),
    "dora": LoraSpec(r=4, alpha=8, use_dora=True),
    "patterns": LoraSpec(r=8, alpha=16, rank_pattern={"down_proj": 4},
                         alpha_pattern={"v_proj": 4.0}),
}


def _randomize(lora, seed: int = 0):
    """Non-zero A and B (and a perturbed DoRA magnitude) so that parity tests can fail."""
    leaves, tree = jax.tree.flatten(lora, is_leaf=lambda x: isinstance(x, LoraWeights))
    key = jax.random.key(seed)
    out = []
    for i, ad in enumerate(leaves):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        m = None if ad.m is None else ad.m * (1 + 0.2 * jax.random.normal(k3, ad.m.shape))
        out.append(ad.replace(a=0.3 * jax.random.normal(k1, ad.a.shape),
                              b=0.3 * jax.random.normal(k2, ad.b.shape), m=m))
    return jax.tree.unflatten(tree, out)


def _tokens(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, 24), dtype=np.int64)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def test_fresh_adapter_is_exact_noop(hf_model_factory):
    path, _ = hf_model_factory("llama")
    config, params = load_hf(path)
    tokens = jnp.asarray(_tokens(config.vocab_size), jnp.int32)
    base = np.asarray(forward(config, params, tokens))
    lora = lora_init(jax.random.key(0), config, params, SPECS["lora"])
    np.testing.assert_array_equal(np.asarray(forward(config, params, tokens, lora=lora)), base)
    # DoRA starts at m = ||W||, so m / ||W + 0|| is 1 up to the rounding of two separately
    # computed norms (eager at init, fused in the forward): a no-op to ~1 ulp per layer.
    dora = lora_init(jax.random.key(0), config, params, SPECS["dora"])
    np.testing.assert_allclose(np.asarray(forward(config, params, tokens, lora=dora)), base,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_peft_export_loads_with_same_logits(hf_model_factory, tmp_path, name):
    import transformers
    from peft import PeftModel, get_peft_model_state_dict

    path, _ = hf_model_factory("qwen2")
    config, params = load_hf(path)
    lora = _randomize(lora_init(jax.random.key(1), config, params, SPECS[name]))
    out = save_peft(tmp_path / "adapter", config, lora, base_model_name_or_path=str(path))
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    model = PeftModel.from_pretrained(base, out).eval()
    ours = SafetensorsFile(out / "adapter_model.safetensors")
    theirs = {k.replace(".default", ""): v for k, v in get_peft_model_state_dict(model).items()}
    assert sorted(theirs) == sorted(ours.keys())  # no missing or unexpected keys
    for k in ours.keys():
        np.testing.assert_array_equal(theirs[k].numpy(), ours.get(k), err_msg=k)
    tokens = _tokens(config.vocab_size)
    ref = _torch_logits(model, tokens)
    got = np.asarray(forward(config, params, jnp.asarray(tokens, jnp.int32), lora=lora))
    assert np.abs(got - ref).max() <= 1e-4
    base_logits = np.asarray(forward(config, params, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(ref - base_logits).max() > 1e-2  # the adapter is far from a no-op
    # Round trip through our own reader.
    back = load_peft(out, config)
    for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_peft_created_adapter_loads_into_jaxft(hf_model_factory, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    path, _ = hf_model_factory("llama")
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj", "up_proj"])).eval()
    model.save_pretrained(tmp_path / "peft")
    config, params = load_hf(path)
    lora = load_peft(tmp_path / "peft", config)
    tokens = _tokens(config.vocab_size, seed=2)
    got = np.asarray(forward(config, params, jnp.asarray(tokens, jnp.int32), lora=lora))
    base_logits = np.asarray(forward(config, params, jnp.asarray(tokens, jnp.int32)))
    ref = _torch_logits(model, tokens)
    assert np.abs(ref - base_logits).max() > 1e-2  # the adapter is far from a no-op
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_matches_peft_merge_and_unload(hf_model_factory, tmp_path, name):
    import transformers
    from peft import PeftModel

    path, _ = hf_model_factory("llama")
    config, params = load_hf(path)
    lora = _randomize(lora_init(jax.random.key(2), config, params, SPECS[name]), seed=3)
    save_peft(tmp_path / "adapter", config, lora)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    merged_ref = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
    merged = lora_merge(config, params, lora)
    out = save_hf(tmp_path / "merged", config, merged)
    ours = SafetensorsFile(out / "model.safetensors")
    ref_sd = merged_ref.state_dict()
    for k in ours.keys():
        np.testing.assert_allclose(ours.get(k), ref_sd[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    tokens = _tokens(config.vocab_size, seed=4)
    unmerged = np.asarray(forward(config, params, jnp.asarray(tokens, jnp.int32), lora=lora))
    merged_logits = np.asarray(forward(config, merged, jnp.asarray(tokens, jnp.int32)))
    err = np.abs(merged_logits - unmerged).max()
    assert err <= 1e-4, f"merge error vs unmerged forward {err:.2e}"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(_torch_logits(reloaded, tokens) - _torch_logits(merged_ref, tokens)).max() <= 1e-4


def test_training_touches_only_the_adapter(hf_model_factory):
    path, _ = hf_model_factory("llama")
    config, params = load_hf(path)
    before = jax.tree.map(np.array, params)
    lora = lora_init(jax.random.key(0), config, params, LoraSpec(r=4, alpha=8, dropout=0.1))
    tokens = jnp.asarray(_tokens(config.vocab_size), jnp.int32)

    def loss_fn(lora, rng):
        logits = forward(config, params, tokens[:, :-1], lora=lora, dropout_rng=rng)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    opt = optax.adamw(1e-2)
    state = opt.init(lora)

    @jax.jit
    def step(lora, state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(lora, rng)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    losses = []
    for i in range(8):
        lora, state, loss = step(lora, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    # B moved away from zero: the adapter is now active.
    assert float(jnp.abs(lora["layers"]["self_attn"]["q_proj"]["adapter"].b).max()) > 0
