"""Public loss functions (DESIGN.md ``jaxft.losses``): pure, jit-able, fp32.

Public API: ``masked_nll`` (token NLL as ``(sum, count)``), ``sequence_logprobs``,
``preference_logprobs``, ``dpo_loss``, ``kto_loss``, ``orpo_loss``, ``simpo_loss``.
The implementations live in ``jaxft.train.losses`` and ``jaxft.train.preference``.
"""

from jaxft.train.losses import masked_nll
from jaxft.train.preference import (
    dpo_loss,
    kto_loss,
    orpo_loss,
    preference_logprobs,
    sequence_logprobs,
    simpo_loss,
)

__all__ = [
    "dpo_loss",
    "kto_loss",
    "masked_nll",
    "orpo_loss",
    "preference_logprobs",
    "sequence_logprobs",
    "simpo_loss",
]
