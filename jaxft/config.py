"""The typed run configuration: one section per subsystem, YAML files as instances.

``load_config(path, overrides)`` reads a YAML file, applies ``key=value`` overrides with dotted
paths (``optim.lr=1e-4``, ``lora.targets=[q_proj,v_proj]``), validates types with pydantic and
turns any problem into one ``ConfigError`` that names the file, the dotted key and, for an unknown
key, the closest valid one. ``save_config`` writes the resolved config next to a run.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from jaxft._schema import Section
from jaxft.data.config import DataConfig
from jaxft.errors import ConfigError

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelSection(Section):
    """Which checkpoint, and how to hold it."""

    path: str | None = None  # HF checkpoint directory (safetensors)
    config: str | None = None  # a config.json to use when ``path`` is not on disk (planning)
    tokenizer: str | None = None  # tokenizer directory; None = ``path``
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter (storage) dtype of the base
    compute_dtype: Literal["float32", "bfloat16"] | None = None  # None = ``dtype``
    scan_layers: bool = True
    remat: Literal["none", "full", "dots"] = "none"


class LoraOverride(Section):
    r: int | None = Field(default=None, gt=0)
    alpha: float | None = None


class LoraSection(Section):
    """LoRA / DoRA adapters (PEFT semantics: scaling = alpha / r, or alpha / sqrt(r) with rsLoRA)."""

    r: int = Field(default=16, gt=0)
    alpha: float = 32.0
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: list(LINEAR_TARGETS))
    rslora: bool = False
    use_dora: bool = False
    # Per-module overrides keyed by a regex over the HF module path, e.g. {"mlp\\..*": {r: 8}}.
    overrides: dict[str, LoraOverride] = Field(default_factory=dict)


class QuantSection(Section):
    base: Literal["none", "nf4"] = "none"  # nf4 = QLoRA: NF4 + double quantization base
    block_size: int = 64
    double_quant: bool = True


class OptimSection(Section):
    """AdamW with warmup then cosine decay to ``final_lr_ratio`` of the peak (SPECS.md section 6)."""

    lr: float = Field(default=2e-4, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    final_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    z_loss: float = 0.0


class MeshSection(Section):
    """Device mesh ``('data', 'fsdp', 'tensor')``; one axis may be -1 to take the rest."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Logical axis name -> mesh axis (or list of axes, or null for replicated).
    rules: dict[str, str | list[str] | None] = Field(
        default_factory=lambda: {
            "batch": ["data", "fsdp"],
            "layers": None,
            "embed": "fsdp",
            "vocab": "tensor",
            "heads": "tensor",
            "kv_heads": "tensor",
            "mlp": "tensor",
            "lora_rank": None,
            "nf4_packed": "fsdp",
            "nf4_blocks": "fsdp",
        }
    )

    @model_validator(mode="after")
    def _one_wildcard(self) -> MeshSection:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError("mesh axis sizes must be positive or -1")
        return self


class TrainSection(Section):
    method: Literal["lora", "full"] = "lora"
    objective: Literal["sft", "dpo", "ipo", "hinge", "kto", "orpo", "simpo"] = "sft"
    steps: int = Field(default=100, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = Field(default=1, gt=0)
    eval_every: int = Field(default=0, ge=0)  # 0 = only at the end
    save_every: int = Field(default=0, ge=0)  # 0 = only at the end
    keep_checkpoints: int = Field(default=2, gt=0)
    early_stopping_patience: int = Field(default=0, ge=0)  # 0 = off
    early_stopping_min_delta: float = 0.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    beta: float = Field(default=0.1, gt=0)  # preference objectives (DPO/IPO/hinge/KTO/ORPO/SimPO)
    simpo_gamma: float = 0.5
    precompute_ref: bool = False  # reference log-probs computed once before training
    dpo_sft_weight: float = Field(default=0.0, ge=0)  # + weight * NLL(chosen) (TRL "sft"; RPO)
    kto_desirable_weight: float = Field(default=1.0, gt=0)
    kto_undesirable_weight: float = Field(default=1.0, gt=0)
    profile: bool = False


class EvalSection(Section):
    metrics: list[Literal["loss", "json"]] = Field(default_factory=lambda: ["loss"])
    prompts: str | None = None  # held-out prompts for generation metrics (JSONL)
    json_schema: str | None = None  # a JSON Schema file for the json metric
    max_new_tokens: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    batch_size: int = Field(default=8, gt=0)


class ExportSection(Section):
    formats: list[Literal["hf", "peft", "bnb-nf4", "gguf"]] = Field(default_factory=list)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    max_shard_gb: float = Field(default=5.0, gt=0)


class Config(Section):
    """A whole run. Every key of a YAML file must be one of these fields."""

    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimSection = Field(default_factory=OptimSection)
    mesh: MeshSection = Field(default_factory=MeshSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=1e-4'`` -> ``(['optim', 'lr'], 1e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def _apply(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.get(k)
        if not isinstance(node, dict):
            node = tree[k] = {}
        tree = node
    tree[keys[-1]] = value


def _valid_keys(model: type[Section], prefix: tuple[str, ...]) -> list[str]:
    for name in prefix:
        field = model.model_fields.get(name)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, Section)):
            return []
        model = ann
    return list(model.model_fields)


def _closest(name: str, valid: list[str]) -> list[str]:
    """The valid key a typo most likely meant: close spelling, else a shared prefix."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return close
    prefixed = [v for v in valid if name.startswith(v) or v.startswith(name)]
    if prefixed:
        return [max(prefixed, key=len)]
    return difflib.get_close_matches(name, valid, n=1, cutoff=0.3)


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(Config, tuple(loc[:-1]))
            close = _closest(loc[-1], valid)
            hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
            lines.append(f"unknown key '{dotted}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            got = e.get("input")
            lines.append(f"'{dotted}': {e['msg']} (got {got!r})")
    return f"{source}: " + "; ".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        _apply(raw, keys, value)
    if overrides:
        source += " + overrides"
    return config_from_dict(raw, source)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config (every default filled in) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
