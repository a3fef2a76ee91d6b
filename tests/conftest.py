"""Shared test helpers: tiny transformers models built in the test with a fixed seed."""

from __future__ import annotations

import os

# Tests run on the CPU, never reach a hub, and keep XLA to the machine's cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def make_hf_model(tmp_path, kind: str = "llama", seed: int = 0, **overrides):
    """Build, perturb (non-trivial norms and biases) and save a tiny HF model; return (dir, model)."""
    import torch
    import transformers

    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, initializer_range=0.1,
    )
    base.update(overrides)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    config = cls[0](**base)
    model = cls[1](config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    path = tmp_path / f"hf-{kind}"
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def hf_model_factory(tmp_path):
    def factory(kind: str = "llama", **overrides):
        return make_hf_model(tmp_path, kind, **overrides)

    return factory
