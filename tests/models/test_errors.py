"""Clear, actionable errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxft.errors import CheckpointError
from jaxft.models import load_hf
from jaxft.models.safetensors_io import SafetensorsFile, save_file


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: checkpoint directory not found"):
        load_hf(tmp_path / "nope")


def test_missing_weights_file(hf_model_factory):
    path, _ = hf_model_factory("llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors"):
        load_hf(path)


def test_missing_shard(hf_model_factory, tmp_path):
    path, _ = hf_model_factory("llama")
    f = SafetensorsFile(path / "model.safetensors")
    keys = f.keys()
    save_file({k: f.get(k) for k in keys[:3]}, path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < 3
                                                else "model-00002-of-00002.safetensors")
                                            for i, k in enumerate(keys)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: shard listed"):
        load_hf(path)


def test_pickled_checkpoint_is_refused(hf_model_factory):
    path, _ = hf_model_factory("llama")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*safetensors only"):
        load_hf(path)


def test_missing_config(hf_model_factory):
    path, _ = hf_model_factory("llama")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: config.json not found"):
        load_hf(path)


def test_shape_mismatch_names_tensor_and_file(hf_model_factory):
    path, _ = hf_model_factory("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_hf(path)
    msg = str(e.value)
    assert "model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64]" in msg
    assert "implies [80, 64]" in msg and "config does not match the weights" in msg


def test_unexpected_and_missing_tensors(hf_model_factory, tmp_path):
    path, _ = hf_model_factory("llama")
    f = SafetensorsFile(path / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys() if "layers.1.mlp.up_proj" not in k}
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)
    shutil.rmtree(tmp_path / "bad", ignore_errors=True)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_hf(path)
    assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in str(e.value)
    assert "unexpected tensors ['model.layers.0.self_attn.q_norm.weight']" in str(e.value)


def test_unsupported_model_type(hf_model_factory):
    path, _ = hf_model_factory("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported"):
        load_hf(path)
