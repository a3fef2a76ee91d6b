"""Real-size architectures: parameter counts from jax.eval_shape equal the published ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxft.models import LlamaConfig, abstract_params, count_params

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"

PUBLISHED = {
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "qwen2.5-7b": 7_615_616_512,
    "mistral-7b": 7_241_732_096,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count(name):
    config = LlamaConfig.from_json(MODELS / f"{name}.json", dtype="bfloat16",
                                   param_dtype="bfloat16")
    assert count_params(abstract_params(config)) == PUBLISHED[name]


def test_every_shipped_model_config_is_covered():
    assert {p.stem for p in MODELS.glob("*.json")} == set(PUBLISHED)
