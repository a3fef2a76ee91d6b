"""The one table between Hugging Face tensor names and jaxft parameter paths.

Import (``load_hf``) and export (``save_hf``, PEFT and bitsandbytes writers) all iterate
``key_table(config)``, so a round trip cannot drift. Linear weights are stored by HF as
``[out, in]`` and by jaxft as ``[in, out]`` kernels: ``transpose=True`` marks them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxft.models.config import LlamaConfig

# Names inside one decoder layer: (HF suffix, jaxft sub-path, transpose, present(config)).
_LAYER_ENTRIES: tuple[tuple[str, tuple[str, ...], bool, str], ...] = (
    ("input_layernorm.weight", ("input_layernorm", "scale"), False, "always"),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False, "always"),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True, "always"),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True, "always"),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True, "always"),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True, "always"),
    ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), False, "qkv_bias"),
    ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), False, "qkv_bias"),
    ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), False, "qkv_bias"),
    ("self_attn.o_proj.bias", ("self_attn", "o_proj", "bias"), False, "o_bias"),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True, "always"),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True, "always"),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True, "always"),
    ("mlp.gate_proj.bias", ("mlp", "gate_proj", "bias"), False, "mlp_bias"),
    ("mlp.up_proj.bias", ("mlp", "up_proj", "bias"), False, "mlp_bias"),
    ("mlp.down_proj.bias", ("mlp", "down_proj", "bias"), False, "mlp_bias"),
)

# HF module names of the linear layers inside a decoder layer (LoRA targets).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One HF tensor: its name, jaxft path, layer index (``None`` for top-level) and layout."""

    hf_name: str
    path: tuple[str, ...]  # path inside a layer for layer tensors, else the full path
    layer: int | None
    transpose: bool

    @property
    def is_linear_weight(self) -> bool:
        """A linear layer's weight inside a decoder layer (what NF4 quantizes and LoRA adapts)."""
        return self.layer is not None and self.path[-1] == "kernel"

    @property
    def module(self) -> str:
        """The HF module path, e.g. ``model.layers.3.self_attn.q_proj``."""
        return self.hf_name.rsplit(".", 1)[0]

    def param_path(self, scan_layers: bool) -> tuple[str, ...]:
        """Path in the jaxft tree; scanned layers index the stacked array with ``self.layer``."""
        if self.layer is None:
            return self.path
        return (("layers",) if scan_layers else (f"layers_{self.layer}",)) + self.path


def key_table(config: LlamaConfig) -> list[KeyEntry]:
    """Every HF tensor name of a checkpoint of this architecture, in HF's order."""
    present = {
        "always": True,
        "qkv_bias": config.qkv_bias,
        "o_bias": config.o_bias,
        "mlp_bias": config.mlp_bias,
    }
    table = [KeyEntry("model.embed_tokens.weight", ("embed_tokens",), None, False)]
    for i in range(config.num_layers):
        for suffix, path, transpose, cond in _LAYER_ENTRIES:
            if present[cond]:
                table.append(KeyEntry(f"model.layers.{i}.{suffix}", path, i, transpose))
    table.append(KeyEntry("model.norm.weight", ("norm",), None, False))
    if not config.tie_word_embeddings:
        table.append(KeyEntry("lm_head.weight", ("lm_head", "kernel"), None, True))
    return table


# Tensors some checkpoints carry that are derived, not learned: safe to ignore on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def get_path(tree: Any, path: Sequence[str]) -> Any:
    """``tree[path[0]][path[1]]...``: a parameter by its path (``KeyEntry.param_path``)."""
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Put ``value`` at ``path`` in a nested dict, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
