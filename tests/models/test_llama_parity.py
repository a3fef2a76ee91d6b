"""Logits parity with transformers (fp32) on tiny random models, and HF round trips."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.models import forward, load_hf, save_hf
from jaxft.models.safetensors_io import SafetensorsFile

TOL = 1e-4  # max abs logits difference, fp32 (issue 2); never loosened

VARIANTS = {
    "llama_gqa": ("llama", {}),
    "llama31_rope_scaling": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "llama_linear_rope": (
        "llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                       "factor": 4.0})
    ),
    "mqa": ("llama", dict(num_key_value_heads=1)),
    "explicit_head_dim": ("llama", dict(head_dim=32)),
    "llama_attention_bias": ("llama", dict(attention_bias=True)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral_sliding_window": ("mistral", dict(sliding_window=8, head_dim=16)),
    "qwen2_sliding_layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
             layer_types=["full_attention", "sliding_attention"]),
    ),
}


def _tokens(vocab: int, batch: int = 2, length: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int64)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(hf_model_factory, name):
    kind, overrides = VARIANTS[name]
    path, model = hf_model_factory(kind, **overrides)
    config, params = load_hf(path)
    tokens = _tokens(config.vocab_size)
    ours = np.asarray(forward(config, params, jnp.asarray(tokens, jnp.int32)))
    ref = _hf_logits(model, tokens)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= TOL, f"{name}: max abs logits error {err:.3e}"


def test_sliding_window_matters(hf_model_factory):
    """Guard against a test that cannot fail: the window changes the logits of this model."""
    path, _ = hf_model_factory("mistral", sliding_window=8, head_dim=16)
    config, params = load_hf(path)
    tokens = jnp.asarray(_tokens(config.vocab_size), jnp.int32)
    windowed = forward(config, params, tokens)
    full = forward(config.replace(layer_windows=(0,) * config.num_layers), params, tokens)
    assert float(jnp.abs(windowed - full).max()) > 1e-3


def test_round_trip_and_layouts(hf_model_factory, tmp_path):
    path, model = hf_model_factory("qwen2", tie_word_embeddings=False)
    config, params = load_hf(path)
    out = save_hf(tmp_path / "export", config, params, source_dir=path)
    src, dst = SafetensorsFile(path / "model.safetensors"), SafetensorsFile(out / "model.safetensors")
    assert sorted(src.keys()) == sorted(dst.keys())
    assert dst.metadata == {"format": "pt"}
    for k in src.keys():
        np.testing.assert_array_equal(src.get(k), dst.get(k), err_msg=k)

    import transformers

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = _tokens(config.vocab_size, seed=3)
    np.testing.assert_array_equal(_hf_logits(reloaded.eval(), tokens), _hf_logits(model, tokens))

    # Scanned and unrolled layers give the same logits.
    config_u, params_u = load_hf(path, scan_layers=False)
    assert "layers_1" in params_u and "layers" not in params_u
    t = jnp.asarray(tokens, jnp.int32)
    np.testing.assert_allclose(
        np.asarray(forward(config_u, params_u, t)), np.asarray(forward(config, params, t)),
        rtol=0, atol=1e-5,
    )


def test_sharded_export_reloads(hf_model_factory, tmp_path):
    path, model = hf_model_factory("llama")
    config, params = load_hf(path)
    out = save_hf(tmp_path / "sharded", config, params, max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config2, params2 = load_hf(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _tokens(config.vocab_size, seed=5)
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))


def test_bf16_export_and_load(hf_model_factory, tmp_path):
    path, model = hf_model_factory("llama")
    config, params = load_hf(path)
    out = save_hf(tmp_path / "bf16", config, params, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    config_b, params_b = load_hf(out, dtype="bfloat16")
    assert jax.tree.leaves(params_b)[0].dtype == jnp.bfloat16
    logits = forward(config_b, params_b, jnp.asarray(_tokens(config.vocab_size), jnp.int32))
    assert logits.dtype == jnp.bfloat16


def test_packed_rows_equal_separate_examples(hf_model_factory):
    path, _ = hf_model_factory("llama")
    config, params = load_hf(path)
    rng = np.random.default_rng(1)
    a = rng.integers(0, config.vocab_size, 11)
    b = rng.integers(0, config.vocab_size, 15)
    packed = np.concatenate([a, b, np.zeros(6, np.int64)])[None]
    seg = np.array([[1] * 11 + [2] * 15 + [0] * 6])
    pos = np.array([list(range(11)) + list(range(15)) + [0] * 6])
    logits = np.asarray(forward(config, params, jnp.asarray(packed, jnp.int32),
                                segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)))
    alone_a = np.asarray(forward(config, params, jnp.asarray(a[None], jnp.int32)))
    alone_b = np.asarray(forward(config, params, jnp.asarray(b[None], jnp.int32)))
    np.testing.assert_allclose(logits[0, :11], alone_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[0, 11:26], alone_b[0], atol=1e-5, rtol=0)
