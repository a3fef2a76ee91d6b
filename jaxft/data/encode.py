"""Rows to tokenized examples: render, tokenize in batches, mask, handle bad and overlong rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Bool, Int

from jaxft.data.chat import IM_END, IM_START, Rendered, TemplateRenderer, render_chatml
from jaxft.data.config import DataConfig
from jaxft.data.rows import Chat, Kto, Pair, RowError, Text
from jaxft.data.sources import Row
from jaxft.data.tokens import backend, resolve_pad_id, tokenize_rendered
from jaxft.errors import DataError


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized sequence. ``mask`` is per token: True where the token is trained (an
    assistant token or its end-of-turn token). ``gid`` is the row's global index."""

    gid: int
    ids: Int[np.ndarray, " L"]
    mask: Bool[np.ndarray, " L"]

    @property
    def prompt_len(self) -> int:
        """Tokens before the first trained one (the prompt, generation header included)."""
        return int(np.argmax(self.mask)) if self.mask.any() else len(self.ids)

    @property
    def trained(self) -> int:
        """Trained targets: the first token is never a target."""
        return int(self.mask[1:].sum())


@dataclass(frozen=True, slots=True)
class PairExample:
    """A preference pair: prompt + chosen and prompt + rejected, masks on the completions."""

    gid: int
    chosen: Example
    rejected: Example


@dataclass(frozen=True, slots=True)
class KtoExample:
    gid: int
    example: Example
    label: bool


AnyExample = Example | PairExample | KtoExample


@dataclass
class DataStats:
    """Counts of what happened to the rows; nothing leaves the pipeline without being counted."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> examples dropped (overlong)
    skipped: Counter = field(default_factory=Counter)  # kind -> bad rows skipped (on_error=skip)
    skip_samples: dict[str, str] = field(default_factory=dict)  # kind -> first message

    def copy(self) -> DataStats:
        return DataStats(
            self.rows,
            self.examples,
            self.tokens,
            self.trained_tokens,
            self.truncated,
            Counter(self.dropped),
            Counter(self.skipped),
            dict(self.skip_samples),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "examples": self.examples,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            "skipped": dict(self.skipped),
            "skip_samples": dict(self.skip_samples),
        }


class Encoder:
    """Turns rows into examples under a ``DataConfig`` (template, seq_len, overlong, on_error)."""

    def __init__(self, cfg: DataConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        backend(tokenizer)
        self.pad_id = resolve_pad_id(tokenizer, cfg.pad_token)
        if cfg.template == "chatml":
            added = {t.content for t in tokenizer.added_tokens_decoder.values()}
            missing = [t for t in (IM_START, IM_END) if t not in added]
            if missing:
                raise DataError(
                    f"data.template=chatml needs {missing} as special tokens of the "
                    "tokenizer; use data.template=tokenizer or a tokenizer with ChatML tokens"
                )
            self._render = render_chatml
        else:
            self._render = TemplateRenderer(tokenizer, cfg.mask_method)
        self._bos, self._eos = _text_affixes(tokenizer, cfg.append_eos)
        self._bos_id: int | None = tokenizer.bos_token_id

    def encode(self, rows: Sequence[Row], stats: DataStats) -> list[AnyExample]:
        """Examples for ``rows`` in order; bad rows raise or are counted in ``stats``."""
        jobs: list[tuple[Row, list[Rendered]]] = []
        for row in rows:
            stats.rows += 1
            try:
                jobs.append((row, self._render_row(row.value)))
            except RowError as e:
                self._bad(row, e, stats)
        flat = [r for _, rs in jobs for r in rs]
        tokenized = iter(tokenize_rendered(self.tokenizer, flat)) if flat else iter(())
        out: list[AnyExample] = []
        for row, rendered in jobs:
            parts = [Example(row.gid, *next(tokenized)) for _ in rendered]
            ex = self._assemble(row, parts, stats)
            if ex is not None:
                out.append(ex)
        return out

    def _render_row(self, value: Any) -> list[Rendered]:
        if isinstance(value, RowError):
            raise value
        if isinstance(value, Chat):
            return [self._render(value.messages, value.train_from)]
        if isinstance(value, Text):
            text = f"{self._bos}{value.text}{self._eos}"
            return [Rendered(text, ((0, len(text)),))]
        if isinstance(value, Pair):
            n = len(value.prompt)
            return [
                self._render(value.prompt + value.chosen, n),
                self._render(value.prompt + value.rejected, n),
            ]
        assert isinstance(value, Kto)
        return [self._render(value.prompt + value.completion, len(value.prompt))]

    def _assemble(self, row: Row, parts: list[Example], stats: DataStats) -> AnyExample | None:
        for part in parts:
            if part.trained == 0:
                self._bad(
                    row,
                    RowError(
                        None,
                        "no token is trained: the rendered row has no trained token after "
                        "its first (an assistant turn that renders to nothing, or a one-token "
                        "text)",
                        "empty_mask",
                    ),
                    stats,
                )
                return None
        seq_len = self.cfg.seq_len
        if any(len(p.ids) > seq_len for p in parts):
            if self.cfg.overlong == "drop":
                stats.dropped["overlong"] += 1
                return None
            if isinstance(row.value, (Pair, Kto)):
                parts = fit_completions(parts, seq_len, self._bos_id)
            else:
                parts = [Example(p.gid, p.ids[:seq_len], p.mask[:seq_len]) for p in parts]
            if any(p.trained == 0 for p in parts):
                stats.dropped["no_trained_token_within_seq_len"] += 1
                return None
            stats.truncated += 1
        stats.examples += 1
        stats.tokens += sum(len(p.ids) for p in parts)
        stats.trained_tokens += sum(p.trained for p in parts)
        if isinstance(row.value, Pair):
            return PairExample(row.gid, *parts)
        if isinstance(row.value, Kto):
            return KtoExample(row.gid, parts[0], row.value.label)
        return parts[0]

    def _bad(self, row: Row, err: RowError, stats: DataStats) -> None:
        message = f"{row.ref}: {err}"
        if self.cfg.on_error == "raise":
            raise DataError(
                f"{message}. Fix the row, or set data.on_error=skip to skip bad rows "
                "(they are counted and reported)"
            )
        stats.skipped[err.kind] += 1
        stats.skip_samples.setdefault(err.kind, message)


def fit_completions(parts: Sequence[Example], seq_len: int, bos_id: int | None) -> list[Example]:
    """Cut prompt + completion examples that share a prompt (the two sides of a preference pair,
    a KTO example) to at most ``seq_len`` tokens: completions keep their head, the prompt its tail.

    The prompt keeps ``max(seq_len - longest completion, seq_len // 2)`` tokens (all of it when
    shorter), the same for every part so that both sides of a pair see the same context, and a
    leading ``bos_id`` stays in front; completions get the rest. This is the split of TRL 0.x's
    ``DPOTrainer.tokenize_row`` (``trl/trainer/dpo_trainer.py``): prompt cut from the left
    (``truncation_mode="keep_end"``, then its default), responses cut to what is left, with the
    prompt budget taken from ``seq_len`` rather than a ``max_prompt_length``. (TRL 1.x instead
    cuts the end of the whole sequence and drops examples whose prompt alone fills it.) A
    completion keeps at least ``seq_len - seq_len // 2`` tokens, so always some trained ones.
    """
    longest = max(len(p.ids) - p.prompt_len for p in parts)
    budget = max(seq_len - longest, seq_len // 2)
    out = []
    for p in parts:
        n = p.prompt_len
        keep = min(n, budget)
        # Keep a BOS the template put first: the model never saw a prompt without one.
        head = int(keep < n and bos_id is not None and int(p.ids[0]) == bos_id)
        start = n - (keep - head)
        room = seq_len - keep
        ids = np.concatenate([p.ids[:head], p.ids[start:n], p.ids[n : n + room]])
        mask = np.concatenate([p.mask[:head], p.mask[start:n], p.mask[n : n + room]])
        out.append(Example(p.gid, ids, mask))
    return out


def _text_affixes(tokenizer: Any, append_eos: bool) -> tuple[str, str]:
    """BOS (when the tokenizer adds one by itself) and EOS strings around plain-text rows."""
    ids = backend(tokenizer).encode("a", add_special_tokens=True).ids
    bos = tokenizer.bos_token if tokenizer.bos_token and ids[:1] == [tokenizer.bos_token_id] else ""
    eos = tokenizer.eos_token if append_eos and tokenizer.eos_token else ""
    return bos, eos
