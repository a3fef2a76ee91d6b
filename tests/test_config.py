"""Typed configuration: YAML instances, dotted overrides, one clear error per mistake."""

from __future__ import annotations

import pytest
import yaml

from jaxft.config import Config, load_config, save_config
from jaxft.errors import ConfigError


def _write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 1.0e-4\nlora:\n  r: 8\n")
    cfg = load_config(p, ["optim.lr=3e-4", "lora.targets=[q_proj, v_proj]", "quant.base=nf4"])
    assert cfg.optim.lr == 3e-4 and cfg.lora.r == 8
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.quant.base == "nf4"


def test_unknown_key_names_closest(tmp_path):
    p = _write(tmp_path, "lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "unknown key 'lora.rank'" in msg and "did you mean 'lora.r'" in msg


def test_unknown_section_and_override(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*did you mean 'optim'"):
        load_config(_write(tmp_path, "optimizer:\n  lr: 1\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'"):
        load_config(None, ["optim.learning_rate=1e-3"])


def test_type_errors_name_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lr'.*got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'quant.base'"):
        load_config(None, ["quant.base=int3"])
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        load_config(None, ["optim.lr"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(_write(tmp_path, "optim: [unclosed\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7", "mesh.fsdp=2", "mesh.data=-1"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert Config.model_validate(yaml.safe_load(out.read_text())) == cfg
    assert load_config(out) == cfg


def test_mesh_one_wildcard():
    with pytest.raises(ConfigError, match="at most one of mesh"):
        load_config(None, ["mesh.data=-1", "mesh.fsdp=-1"])
