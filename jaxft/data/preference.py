"""Batches for preference training (DPO, IPO, hinge, ORPO, SimPO) and KTO: one forward per batch.

A batch holds up to ``b = batch_pairs / process_count`` *units* per process: preference pairs
(``prompt``, ``chosen``, ``rejected``) or KTO examples (``prompt``, ``completion``, ``label``).
Each unit gives two sequences, so a batch carries ``E = 2 * batch_pairs`` examples over all
processes, numbered as TRL concatenates them:

- pairs: ``0..B-1`` the chosen sequences, ``B..2B-1`` the rejected ones of the same pairs;
- KTO: ``0..B-1`` the (prompt, completion) examples, ``B..2B-1`` the KL examples. KL example ``i``
  is prompt ``i`` with the completion of example ``i - 1`` (the last one's for ``i = 0``), TRL's
  ``KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]`` over each per-device batch
  (``KTOTrainer._prepare_dataset``, ``trl/trainer/kto_trainer.py``); here over the process's batch.

Pair ``i`` of process ``p`` is global pair ``p * b + i``, so ``example_index`` is global and a
trainer sums per-token log-probs per example with one segment sum over the global arrays.

Arrays (int32): ``tokens``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions`` and
``example_index`` ``[R, seq_len]`` (``example_index`` -1 on padding; ``loss_mask`` marks targets
that are completion tokens, never a prompt token nor past a sequence's end), ``valid`` ``[b]`` (1
where slot ``i`` holds a unit: the last batch of a run, and packed batches that defer units, hold
fewer than ``b``; slots ``0..n-1`` are used first), and for KTO ``label`` ``[b]`` (1 desirable).

Layout. With ``data.pack=false``, ``R = 2b`` and row ``k`` holds local example ``k`` (chosen of
slot ``i`` in row ``i``, rejected in row ``b + i``). With ``data.pack=true`` the batch's examples
are packed best-fit decreasing into a fixed ``R`` rows, ``R`` chosen once from the data: the 95th
percentile of the rows needed by 64 batches of ``b`` units drawn from the first ``pack_window``
rows of the split (the same on every process and on resume; saved in the state and checked).
A batch takes the next ``b`` pending units when their examples fit in ``R`` rows; otherwise it
goes through the pending units in order, keeping each unit that still fits and deferring the
others, whole, to the next batch (ahead of newer units; the oldest pending unit always fits, so
nothing waits more than a few batches). A unit is never split over batches, no example is lost,
and shapes never change. The two sequences of a pair may share a row: segments isolate them.

Order and resumption follow ``BatchIterator``: rows permuted from ``(seed, epoch)``, process ``p``
takes every ``P``-th row, windows of ``pack_window`` rows are encoded one at a time, units left over
(fewer than ``b``) are carried into the next window and epoch, and whatever is left after the last
epoch comes out in final, partly filled batches. The state is (epoch, window, batches emitted from
the window, row ids of the units carried into it, counters).

Overlong units are cut by the encoder (the prompt keeps its tail, completions their head; see
``fit_completions``) or dropped, by ``data.overlong``, and counted in ``stats``. A KL example
longer than ``seq_len`` is cut the same way (it is built here, so it is not counted).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
from jaxtyping import Int

from jaxft.data.config import DataConfig
from jaxft.data.encode import DataStats, Encoder, Example, KtoExample, PairExample, fit_completions
from jaxft.data.iterator import (
    Prefetcher,
    ResumableIterator,
    epoch_rows,
    open_splits,
    reread,
    stats_from_state,
    stats_state,
)
from jaxft.data.packing import Batch, best_fit_decreasing, pack_rows
from jaxft.data.sources import RowTable
from jaxft.errors import DataError

Objective = Literal["pairs", "kto"]
Unit = PairExample | KtoExample
_FAMILY = {"pairs": "preference", "kto": "kto"}
_TRIALS = 64  # batches simulated to choose the packed row count
_QUANTILE = 0.95  # share of those batches that must fit without deferring a unit


def kl_example(
    prompt_of: Example, completion_of: Example, seq_len: int, bos_id: int | None
) -> Example:
    """The prompt of ``prompt_of`` followed by the completion (tokens and mask) of
    ``completion_of``, cut to ``seq_len`` like an overlong example (``fit_completions``)."""
    p, c = prompt_of.prompt_len, completion_of.prompt_len
    ex = Example(
        prompt_of.gid,
        np.concatenate([prompt_of.ids[:p], completion_of.ids[c:]]),
        np.concatenate([prompt_of.mask[:p], completion_of.mask[c:]]),
    )
    return fit_completions([ex], seq_len, bos_id)[0] if len(ex.ids) > seq_len else ex


def unit_examples(units: Sequence[Unit], seq_len: int, bos_id: int | None) -> list[Example]:
    """The ``2n`` examples of ``n`` units in batch order: chosen then rejected, or the KTO
    examples then their KL examples (prompt ``i`` with completion ``i - 1 mod n``)."""
    if all(isinstance(u, PairExample) for u in units):
        return [u.chosen for u in units] + [u.rejected for u in units]  # type: ignore[union-attr]
    real = [u.example for u in units]  # type: ignore[union-attr]
    return real + [kl_example(real[i], real[i - 1], seq_len, bos_id) for i in range(len(real))]


def unit_lengths(units: Sequence[Unit], seq_len: int) -> list[int]:
    """Token counts of ``unit_examples(units, ...)`` without building them."""
    if all(isinstance(u, PairExample) for u in units):
        pairs: Sequence[PairExample] = units  # type: ignore[assignment]
        return [len(u.chosen.ids) for u in pairs] + [len(u.rejected.ids) for u in pairs]
    real = [u.example for u in units]  # type: ignore[union-attr]
    # fit_completions cuts an overlong KL example to exactly seq_len tokens.
    kl = [
        min(seq_len, real[i].prompt_len + len(real[i - 1].ids) - real[i - 1].prompt_len)
        for i in range(len(real))
    ]
    return [len(ex.ids) for ex in real] + kl


def estimate_rows(units: Sequence[Unit], per_batch: int, seq_len: int, seed: int) -> int:
    """Packed rows for batches of ``per_batch`` units: the 95th percentile of the rows that 64
    batches drawn from ``units`` (with replacement, from ``seed``) need when packed best-fit
    decreasing; between 2 (a unit always fits) and ``2 * per_batch`` (one example per row)."""
    most = 2 * per_batch
    if not units:
        return most
    rng = np.random.default_rng([seed, 0x9E1])
    needed = []
    for _ in range(_TRIALS):
        draw = [units[i] for i in rng.integers(len(units), size=per_batch)]
        needed.append(len(best_fit_decreasing(unit_lengths(draw, seq_len), seq_len)))
    return min(max(int(np.quantile(needed, _QUANTILE, method="higher")), 2), most)


class PreferenceIterator(ResumableIterator):
    """Batches of preference pairs or KTO examples for one forward pass (module docstring).

    ``n_rows`` is ``R``; ``state()`` / ``restore(state)`` resume exactly; ``reset()`` starts over;
    ``close()`` stops the prefetch thread (also on ``with`` exit). ``rows`` fixes ``R`` instead of
    estimating it (packing only).
    """

    def __init__(
        self,
        table: RowTable,
        encoder: Encoder,
        cfg: DataConfig,
        row_ids: np.ndarray,
        *,
        objective: Objective,
        batch_pairs: int,
        process_index: int = 0,
        process_count: int = 1,
        rows: int | None = None,
    ) -> None:
        if objective not in _FAMILY:
            raise DataError(f"objective={objective!r}: use 'pairs' (DPO, IPO, ...) or 'kto'")
        if batch_pairs < 1 or batch_pairs % process_count:
            raise DataError(
                f"batch_pairs={batch_pairs} is not a positive multiple of the "
                f"{process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} out of range for {process_count}")
        if table.family != _FAMILY[objective]:
            raise DataError(
                f"the rows are {table.family} rows; objective {objective!r} takes "
                f"{_FAMILY[objective]} rows"
            )
        self.table, self.encoder, self.cfg, self.objective = table, encoder, cfg, objective
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        self.process_index, self.process_count = process_index, process_count
        self.batch_pairs, self.local = batch_pairs, batch_pairs // process_count
        if objective == "kto" and self.local < 2:
            raise DataError(
                f"KTO needs at least 2 examples per process and batch (batch_pairs={batch_pairs} "
                f"over {process_count} processes): the KL term pairs each prompt with another "
                "example's completion in the batch"
            )
        self.n_rows = self._choose_rows(rows)
        self._bos_id: int | None = encoder.tokenizer.bos_token_id
        self._feed = Prefetcher(self._produce, self._initial_state(), cfg.prefetch)

    @staticmethod
    def _carry_state(carry: list) -> list:
        return [int(g) for g in carry]

    # -- production --------------------------------------------------------------------------

    def _choose_rows(self, rows: int | None) -> int:
        most = 2 * self.local
        if not self.cfg.pack:
            if rows not in (None, most):
                raise DataError(f"rows={rows} needs data.pack=true (unpacked batches have {most})")
            return most
        if rows is not None:
            if not 2 <= rows <= most:
                raise DataError(f"rows={rows} must lie in [2, {most}] for {self.local} units")
            return rows
        sample = epoch_rows(self.row_ids, self.cfg, 0, 0, 1)[: self.cfg.pack_window]
        rows = self.table.read(sample)
        units: list[Unit] = self.encoder.encode(rows, DataStats())  # type: ignore[assignment]
        return estimate_rows(units, self.local, self.cfg.seq_len, self.cfg.seed)

    def _settings(self) -> dict[str, Any]:
        return {"objective": self.objective, "batch_pairs": self.batch_pairs, "n_rows": self.n_rows}

    def _produce(self, start: dict[str, Any]) -> Iterator[tuple[Batch, dict, DataStats]]:
        epoch, window, emitted = start["epoch"], start["window"], start["emitted"]
        stats = stats_from_state(start["stats"])
        by_gid = reread(self.table, self.encoder, start["carry"])
        pending: list[Unit] = [by_gid[g] for g in start["carry"]]  # type: ignore[misc]
        w, num_epochs = self.cfg.pack_window, self.cfg.num_epochs
        if num_epochs is None and not len(self._epoch_rows(0)):
            raise DataError(
                "the data split has no rows for this process; add rows or use fewer processes"
            )
        while num_epochs is None or epoch < num_epochs:
            order = self._epoch_rows(epoch)
            while window * w < len(order):
                carry, window_stats = [u.gid for u in pending], stats_state(stats)
                rows = self.table.read(order[window * w : (window + 1) * w])
                pending = pending + self.encoder.encode(rows, stats)  # type: ignore[operator]
                j = 0
                while len(pending) >= self.local:  # a full batch is pending
                    units, pending = self._take(pending)
                    j += 1
                    if j > emitted:
                        state = self._snapshot(epoch, window, j, carry, window_stats)
                        yield self._batch(units), state, stats.copy()
                window, emitted = window + 1, 0
            epoch, window = epoch + 1, 0
        carry, end_stats, j = [u.gid for u in pending], stats_state(stats), 0
        while pending:  # the end of the run: what is left, in partly filled batches
            units, pending = self._take(pending)
            j += 1
            if j > emitted:
                yield (
                    self._batch(units),
                    self._snapshot(epoch, 0, j, carry, end_stats),
                    stats.copy(),
                )

    def _take(self, pending: list[Unit]) -> tuple[list[Unit], list[Unit]]:
        """The next batch's units and the rest, deferred units first (in their order)."""
        b = self.local
        if self._fits(pending[:b]):
            return pending[:b], pending[b:]
        taken: list[Unit] = []
        deferred: list[Unit] = []
        for k, unit in enumerate(pending):
            if len(taken) == b or len(deferred) == b:  # bounded look-ahead
                return taken, deferred + pending[k:]
            (taken if self._fits([*taken, unit]) else deferred).append(unit)
        return taken, deferred

    def _fits(self, units: list[Unit]) -> bool:
        lengths = unit_lengths(units, self.cfg.seq_len)
        if len(lengths) <= self.n_rows:
            return True
        if sum(lengths) > self.n_rows * self.cfg.seq_len:
            return False
        return len(best_fit_decreasing(lengths, self.cfg.seq_len)) <= self.n_rows

    def _batch(self, units: list[Unit]) -> Batch:
        n, b, seq_len = len(units), self.local, self.cfg.seq_len
        examples = [(ex.ids, ex.mask) for ex in unit_examples(units, seq_len, self._bos_id)]
        slots = [*range(n), *range(b, b + n)]  # local example slot of each example
        if self.cfg.pack:
            bins = best_fit_decreasing([len(ids) for ids, _ in examples], seq_len)
        else:
            bins = [[] for _ in range(2 * b)]
            for j, slot in enumerate(slots):
                bins[slot] = [j]
        batch = pack_rows(examples, bins, seq_len, self.encoder.pad_id, n_rows=self.n_rows)
        first = self.process_index * b + np.arange(n)
        index = np.concatenate([first, self.batch_pairs + first])  # global example ids
        batch["example_index"] = _example_index(batch["segment_ids"], bins, index)
        batch["valid"] = (np.arange(b) < n).astype(np.int32)
        if self.objective == "kto":
            label = np.zeros(b, dtype=np.int32)
            label[:n] = [u.label for u in units]  # type: ignore[union-attr]
            batch["label"] = label
        return batch


def _example_index(
    segment_ids: Int[np.ndarray, "rows seq"], bins: Sequence[Sequence[int]], index: np.ndarray
) -> Int[np.ndarray, "rows seq"]:
    """Per token, ``index[j]`` of the example ``j`` whose segment it is in; -1 on padding."""
    width = 1 + max((len(m) for m in bins), default=0)
    lut = np.full((segment_ids.shape[0], width), -1, dtype=np.int32)
    for r, members in enumerate(bins):
        for s, j in enumerate(members, start=1):
            lut[r, s] = index[j]
    return np.take_along_axis(lut, segment_ids, axis=1)


def build_preference_iterators(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    objective: Objective,
    batch_pairs: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[PreferenceIterator, PreferenceIterator | None]:
    """Train and validation iterators for a preference (``objective="pairs"``) or KTO run.

    ``batch_pairs`` is ``B``, units per batch over all processes; each process yields ``B /
    process_count``. Validation is one pass in order, with the train iterator's row count so that
    every batch of the run has the same shape. Pass ``jax.process_index()`` and
    ``jax.process_count()`` in a multi-process run.
    """
    encoder = Encoder(cfg, tokenizer)
    (table, ids), val = open_splits(cfg)
    kw: dict[str, Any] = {
        "objective": objective,
        "batch_pairs": batch_pairs,
        "process_index": process_index,
        "process_count": process_count,
    }
    train = PreferenceIterator(table, encoder, cfg, ids, **kw)
    if val is None:
        return train, None
    val_cfg = cfg.model_copy(update={"shuffle": False, "num_epochs": 1})
    return train, PreferenceIterator(val[0], encoder, val_cfg, val[1], rows=train.n_rows, **kw)
