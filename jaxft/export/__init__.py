"""Writers for the formats jaxft hands to the PyTorch world.

- ``save_hf``: merged Hugging Face safetensors (``jaxft.models.hf``)
- ``save_peft``: PEFT LoRA/DoRA adapter (``jaxft.peft.formats``)
- ``save_bnb_nf4``: transformers checkpoint in bitsandbytes' NF4 serialization

Restoring a trained run and choosing what to write is ``jaxft.train.exporting.export_run``
(export never imports the training code).
"""

from jaxft.export.bnb_nf4 import save_bnb_nf4
from jaxft.models.hf import save_hf
from jaxft.peft.formats import save_peft

FORMATS = ("hf", "peft", "bnb-nf4", "gguf")

__all__ = ["FORMATS", "save_bnb_nf4", "save_hf", "save_peft"]
