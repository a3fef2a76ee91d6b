"""Architecture of a Llama-family model (Llama 2/3/3.x, Mistral, Qwen2/2.5), read from HF config.json.

``LlamaConfig`` is a frozen, hashable dataclass: it is a static argument of jitted functions and
the attribute of the linen module. ``from_hf`` accepts both transformers 5 configs
(``rope_parameters`` with ``rope_theta`` inside) and the older top-level ``rope_theta`` /
``rope_scaling`` of published checkpoints (SPECS.md section 3 and 8).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxft.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of HF rope_parameters
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    layer_windows: tuple[int, ...] = ()  # per-layer sliding window, 0 = full attention
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime choices (not part of the HF architecture).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots
    # The config.json this came from, for a faithful export; excluded from hashing/equality.
    hf_config: Mapping[str, Any] | None = dataclasses.field(
        default=None, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise CheckpointError(f"{name}={getattr(self, name)!r}: expected one of {_DTYPES}")
        if self.remat not in ("none", "full", "dots"):
            raise CheckpointError(f"remat={self.remat!r}: expected none, full or dots")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise CheckpointError("layer_windows must have one entry per layer")

    @property
    def rope_parameters(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime: Any) -> LlamaConfig:
        """Build from a config.json dict; ``runtime`` sets dtype, param_dtype, scan_layers, remat."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type {model_type!r} is not supported; jaxft loads {SUPPORTED_MODEL_TYPES}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"hidden_act {act!r} is not supported (Llama family uses silu)")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        layers = hf["num_hidden_layers"]
        theta, scaling = _rope_from_hf(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = model_type == "qwen2" or attention_bias
        o_bias = attention_bias and model_type != "qwen2"
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            layer_windows=_windows_from_hf(hf, model_type, layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            hf_config=dict(hf),
            **runtime,
        )

    @classmethod
    def from_json(cls, path: str | Path, **runtime: Any) -> LlamaConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: invalid JSON ({e})") from e
        try:
            return cls.from_hf(hf, **runtime)
        except KeyError as e:
            raise CheckpointError(f"{path}: missing key {e.args[0]!r}") from e

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json of this architecture (the original one, when known)."""
        if self.hf_config is not None:
            out = dict(self.hf_config)
        else:
            arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}[self.model_type]
            rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
            rope.update(self.rope_parameters or {})
            out = {
                "architectures": [arch],
                "model_type": self.model_type,
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "hidden_act": "silu",
                "rms_norm_eps": self.rms_norm_eps,
                "max_position_embeddings": self.max_position_embeddings,
                "rope_parameters": rope,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id,
                "pad_token_id": self.pad_token_id,
            }
            if self.model_type == "llama":
                out["attention_bias"] = self.qkv_bias
                out["mlp_bias"] = self.mlp_bias
            windows = {w for w in self.layer_windows if w}
            if self.model_type == "mistral":
                out["sliding_window"] = windows.pop() if windows else None
        if dtype is not None:
            out["dtype"] = dtype
            out.pop("torch_dtype", None)
        return out


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _windows_from_hf(hf: Mapping[str, Any], model_type: str, layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return (int(window or 0),) * layers
    if model_type == "qwen2" and hf.get("use_sliding_window") and window:
        types = hf.get("layer_types")
        if types:
            return tuple(int(window) if t == "sliding_attention" else 0 for t in types)
        start = hf.get("max_window_layers", layers)
        return tuple(int(window) if i >= start else 0 for i in range(layers))
    return (0,) * layers
