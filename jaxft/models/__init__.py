"""Llama-family models: architecture config, linen module, HF import/export.

Public API: ``LlamaConfig``, ``Transformer``, ``forward``, ``init_params``, ``abstract_params``,
``count_params``, ``load_hf``, ``save_hf``, ``key_table``.
"""

from jaxft.models.config import LlamaConfig
from jaxft.models.hf import architecture, load_hf, save_hf
from jaxft.models.hf_keys import LINEAR_MODULES, KeyEntry, key_table
from jaxft.models.llama import Transformer, abstract_params, count_params, forward, init_params

__all__ = [
    "LINEAR_MODULES",
    "KeyEntry",
    "LlamaConfig",
    "Transformer",
    "abstract_params",
    "architecture",
    "count_params",
    "forward",
    "init_params",
    "key_table",
    "load_hf",
    "save_hf",
]
