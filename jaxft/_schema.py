"""Base class for typed config sections: strict, frozen, with helpful unknown-key errors.

Every section of the run configuration (``jaxft.config.Config``) derives from ``Section``. Unknown
keys are rejected (``extra='forbid'``); ``jaxft.config`` turns pydantic's error into one message
that names the offending dotted key and the closest valid key.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed, immutable config section. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
