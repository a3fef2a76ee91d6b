"""NF4 quantization (QLoRA) bit-compatible with bitsandbytes, and its checkpoint format.

Public API:

- ``NF4Weight``: a quantized matrix (or a stack of them) as a pytree.
- ``nf4_quantize(w, block_size=64, double_quant=True) -> NF4Weight``: a pure state transform.
- ``nf4_dequantize(q, dtype=jnp.float32) -> Array``: what a quantized layer calls per forward.
- ``nf4_block_absmax(q) -> Array``: the fp32 block scales, double quantization undone.
- ``NF4_CODEBOOK``, ``create_dynamic_map``: bitsandbytes' code maps.
- ``nf4_to_bnb`` / ``nf4_from_bnb``: one module's entries of a bitsandbytes checkpoint.
- ``bnb_quantization_config(compute_dtype)``: config.json's ``quantization_config``.
"""

from jaxft.quant._maps import NF4_CODEBOOK, create_dynamic_map
from jaxft.quant.bnb import bnb_quantization_config, nf4_from_bnb, nf4_to_bnb
from jaxft.quant.nf4 import (
    NESTED_BLOCK_SIZE,
    VALID_BLOCK_SIZES,
    NF4Weight,
    nf4_block_absmax,
    nf4_dequantize,
    nf4_quantize,
)

__all__ = [
    "NESTED_BLOCK_SIZE",
    "NF4_CODEBOOK",
    "VALID_BLOCK_SIZES",
    "NF4Weight",
    "bnb_quantization_config",
    "create_dynamic_map",
    "nf4_block_absmax",
    "nf4_dequantize",
    "nf4_from_bnb",
    "nf4_quantize",
    "nf4_to_bnb",
]
