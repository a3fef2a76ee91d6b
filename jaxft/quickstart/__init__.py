"""The embedded end-to-end default (``jaxft quickstart``): generated data, a locally trained
tokenizer, a tiny base model, LoRA SFT, JSON-validity before/after, exports."""

from jaxft.quickstart.pipeline import PRESETS, run_quickstart

__all__ = ["PRESETS", "run_quickstart"]
