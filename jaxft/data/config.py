"""The ``data:`` section of a run configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jaxft._schema import Section

RowFormat = Literal["auto", "messages", "prompt_completion", "text", "preference", "kto"]


class DataConfig(Section):
    """Where the rows come from, how they become tokens, and how they are batched.

    Sources are local paths or globs: ``.jsonl`` / ``.json`` (an array or JSON lines), ``.parquet``,
    ``.csv``, a directory written by ``datasets.save_to_disk`` (``DIR#split`` picks a split of a
    ``DatasetDict``), or ``tfds:NAME#split`` with the ``tfds`` extra. Relative paths are taken from
    the working directory.
    """

    train: tuple[str, ...] = ()
    validation: tuple[str, ...] = ()
    # Held-out share of the train rows, used when no validation sources are given.
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # Row format; "auto" decides per source from the keys of its first row.
    format: RowFormat = "auto"
    # "chatml": built-in ChatML; "tokenizer": the tokenizer's own Jinja chat template.
    template: Literal["chatml", "tokenizer"] = "chatml"
    # How the loss mask is found with template=tokenizer: "auto" uses {% generation %} markers when
    # the template has them and conversation prefixes otherwise.
    mask_method: Literal["auto", "prefix", "markers"] = "auto"
    seq_len: int = Field(2048, ge=8)
    # Rows per optimizer step over all processes (each process yields batch_size / process_count).
    batch_size: int = Field(8, ge=1)
    pack: bool = True
    # Examples packed together (best-fit decreasing); larger windows pack tighter.
    pack_window: int = Field(2048, ge=1)
    overlong: Literal["truncate", "drop"] = "truncate"
    shuffle: bool = True
    seed: int = Field(0, ge=0)
    on_error: Literal["raise", "skip"] = "raise"
    # None repeats the data forever (stop the run with a step count).
    num_epochs: int | None = Field(1, ge=1)
    # Batches prepared ahead in a background thread; 0 prepares them on the caller's thread.
    prefetch: int = Field(2, ge=0)
    # A token of the vocabulary to pad with when the tokenizer has no pad token distinct from EOS.
    pad_token: str | None = None
    # Plain-text rows end with the EOS token, which is trained.
    append_eos: bool = True
    # Inspect warns when chosen and rejected lengths differ more than this (relative).
    length_balance_tolerance: float = Field(0.2, gt=0.0)
    tfds_data_dir: str | None = None

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataConfig:
        if self.validation and self.validation_fraction > 0:
            raise ValueError(
                "data.validation and data.validation_fraction are both set: keep one "
                "(separate validation files, or a held-out fraction of data.train)"
            )
        return self
