"""Pure layers: the linear layer (dense | NF4 base, + LoRA/DoRA), attention, RoPE, RMSNorm."""

from jaxft.nn.attention import attention_mask, dot_product_attention
from jaxft.nn.linear import Linear, base_kernel
from jaxft.nn.lora import LoraWeights
from jaxft.nn.norm import RMSNorm, rms_norm
from jaxft.nn.rope import apply_rope, inv_frequencies, rope_cos_sin

__all__ = [
    "Linear",
    "LoraWeights",
    "RMSNorm",
    "apply_rope",
    "attention_mask",
    "base_kernel",
    "dot_product_attention",
    "inv_frequencies",
    "rms_norm",
    "rope_cos_sin",
]
