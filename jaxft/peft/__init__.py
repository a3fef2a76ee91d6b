"""Parameter-efficient fine-tuning: LoRA / DoRA adapters as a separate tree, merge, PEFT format.

Public API: ``LoraSpec``, ``LoraWeights``, ``lora_init``, ``lora_merge``, ``iter_adapters``,
``count_lora_params``, ``split_variables``, ``combine_variables``, ``save_peft``, ``load_peft``.
"""

from jaxft.nn.lora import LoraWeights
from jaxft.peft.formats import load_peft, save_peft
from jaxft.peft.lora import (
    LoraSpec,
    combine_variables,
    count_lora_params,
    iter_adapters,
    lora_init,
    lora_merge,
    split_variables,
)

__all__ = [
    "LoraSpec",
    "LoraWeights",
    "count_lora_params",
    "iter_adapters",
    "load_peft",
    "lora_init",
    "lora_merge",
    "save_peft",
    "split_variables",
    "combine_variables",
]
