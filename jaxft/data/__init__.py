"""Data: sources, chat rendering, assistant-only loss masks, isolated packing, resumable batches.

Public API:

- ``render_chat(messages, tokenizer=None, template=...)`` -> ``Rendered`` (text + trained spans)
- ``assistant_mask(messages, tokenizer, template=...)`` -> (token ids, per-token loss mask)
- ``pack(examples, seq_len, pad_id)`` -> int32 arrays ``tokens``, ``targets``, ``loss_mask``,
  ``segment_ids``, ``positions``; ``best_fit_decreasing``, ``pack_rows``, ``packing_efficiency``
- ``DataConfig`` (the ``data:`` config section), ``build_iterators(cfg, tokenizer, ...)`` ->
  (train, validation) ``BatchIterator``s with ``state()`` / ``restore()`` / ``reset()`` /
  ``close()``
- ``iter_examples(cfg, tokenizer, split)``: every example of a split, any format (preference
  pairs and KTO rows for their batchers); ``Encoder``, ``Example``, ``PairExample``,
  ``KtoExample``, ``DataStats``, ``open_split(s)``: the pieces underneath
- ``build_preference_iterators(cfg, tokenizer, objective="pairs"|"kto", batch_pairs=B, ...)`` ->
  (train, validation) ``PreferenceIterator``s: chosen/rejected (or KTO + KL) examples of whole
  pairs in one fixed-shape batch with a per-token ``example_index``
- ``load_tokenizer``, ``resolve_pad_id``; ``inspect_data`` lives in ``jaxft.data.inspect``.

Nothing here imports jax or the training code; transformers is imported when first needed.
"""

from jaxft.data.chat import Rendered, TemplateRenderer, render_chat, render_chatml
from jaxft.data.config import DataConfig
from jaxft.data.encode import DataStats, Encoder, Example, KtoExample, PairExample
from jaxft.data.iterator import (
    BatchIterator,
    build_iterators,
    iter_examples,
    open_split,
    open_splits,
)
from jaxft.data.packing import FIELDS, best_fit_decreasing, pack, pack_rows, packing_efficiency
from jaxft.data.preference import PreferenceIterator, build_preference_iterators
from jaxft.data.tokens import assistant_mask, load_tokenizer, resolve_pad_id, tokenize_rendered

__all__ = [
    "FIELDS",
    "BatchIterator",
    "DataConfig",
    "DataStats",
    "Encoder",
    "Example",
    "KtoExample",
    "PairExample",
    "PreferenceIterator",
    "Rendered",
    "TemplateRenderer",
    "assistant_mask",
    "best_fit_decreasing",
    "build_iterators",
    "build_preference_iterators",
    "iter_examples",
    "load_tokenizer",
    "open_split",
    "open_splits",
    "pack",
    "pack_rows",
    "packing_efficiency",
    "render_chat",
    "render_chatml",
    "resolve_pad_id",
    "tokenize_rendered",
]
