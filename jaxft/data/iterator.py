"""The batch iterator: deterministic, sharded across processes, resumable, prefetched.

Per epoch the split's rows are permuted from ``(seed, epoch)``; process ``p`` of ``P`` takes every
``P``-th row of that order, so each process reads, tokenizes and packs only its slice. The slice is
cut into windows of ``pack_window`` rows; a window is encoded and packed (best-fit decreasing), its
rows shuffled from ``(seed, epoch, window, p)``, and emitted ``batch_size / P`` rows at a time.
Rows that do not fill a last batch carry over to the next window; after the last epoch they are
emitted in a final batch filled up with padding rows, so no example is lost.

The state after a batch is (epoch, window, batches emitted from that window, the row ids of the
carried rows, counters): a small JSON dict. Restoring re-reads and re-packs one window and resumes
with exactly the batches the uninterrupted run would have produced.

With packing, processes can end a finite epoch a batch apart (their slices pack differently); a
multi-process run should stop on a step count (or use ``num_epochs: null``).
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxft.data.config import DataConfig
from jaxft.data.encode import AnyExample, DataStats, Encoder, Example
from jaxft.data.packing import Batch, best_fit_decreasing, pack_rows
from jaxft.data.sources import RowTable, open_sources, split_validation
from jaxft.errors import DataError

_STATE_VERSION = 1
_PROGRESS = ("epoch", "window", "emitted", "carry", "stats")  # what a saved state may vary
_END = object()


class ResumableIterator:
    """The protocol both batch iterators share: iteration through a ``Prefetcher``,
    ``state()`` / ``restore()`` / ``reset()``, ``stats``, ``close()`` and ``with``.

    A subclass sets ``self._feed`` and defines ``_settings()``; ``_carry_state`` turns the
    carried rows into JSON-friendly lists and back.
    """

    _feed: Prefetcher
    row_ids: np.ndarray
    cfg: DataConfig
    process_index: int
    process_count: int

    def _settings(self) -> dict[str, Any]:
        """The subclass's own settings that a saved state must match."""
        raise NotImplementedError

    def _initial_state(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "version": _STATE_VERSION,
            "epoch": 0,
            "window": 0,
            "emitted": 0,
            "carry": [],
            "stats": stats_state(DataStats()),
            "rows": len(self.row_ids),
            "process": [self.process_index, self.process_count],
            **self._settings(),
            "seq_len": c.seq_len,
            "pack": c.pack,
            "window_rows": c.pack_window,
            "seed": c.seed,
            "shuffle": c.shuffle,
        }

    @staticmethod
    def _carry_state(carry: list) -> list:
        return [list(b) for b in carry]

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        """This process's row ids for ``epoch``, in order."""
        return epoch_rows(self.row_ids, self.cfg, epoch, self.process_index, self.process_count)

    def _snapshot(self, epoch: int, window: int, emitted: int, carry: list,
                  stats: dict[str, Any]) -> dict[str, Any]:
        """The state after ``emitted`` batches of ``window`` of ``epoch``."""
        return {**self._initial_state(), "epoch": epoch, "window": window, "emitted": emitted,
                "carry": self._carry_state(carry), "stats": stats}

    def __iter__(self) -> ResumableIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._feed)

    def state(self) -> dict[str, Any]:
        """Where the iterator stands after the last batch returned (JSON-serializable)."""
        state = self._feed.state
        return {**state, "carry": self._carry_state(state["carry"]),
                "stats": dict(state["stats"])}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue after the batch at which ``state`` was taken (before iterating further)."""
        self.close()
        expected = self._initial_state()
        check_state(state, expected, [k for k in expected if k not in _PROGRESS])
        self._feed.restart({**state, "carry": self._carry_state(state["carry"])})

    def reset(self) -> None:
        """Start again from the first batch (counters included)."""
        self.restore(self._initial_state())

    @property
    def stats(self) -> DataStats:
        """Counters as of the last batch returned (rows read, skipped, truncated, ...)."""
        return self._feed.stats

    def close(self) -> None:
        """Stop and join the prefetch thread; safe to call more than once."""
        self._feed.close()

    def __enter__(self) -> ResumableIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchIterator(ResumableIterator):
    """Batches of packed (or padded) SFT rows: int32 ``[batch_size / process_count, seq_len]``
    arrays ``tokens``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions``.

    ``state()`` / ``restore(state)`` resume exactly; ``reset()`` starts over (a new evaluation
    pass); ``close()`` stops the prefetch thread (also on ``with`` exit).
    """

    def __init__(
        self,
        table: RowTable,
        encoder: Encoder,
        cfg: DataConfig,
        row_ids: np.ndarray,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        if cfg.batch_size % process_count:
            raise DataError(
                f"data.batch_size={cfg.batch_size} is not a multiple of the "
                f"{process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} out of range for {process_count}")
        if table.family != "sft":
            raise DataError(
                f"the rows are {table.family} rows; the SFT batch iterator takes "
                "messages, prompt_completion and text rows"
            )
        self.table, self.encoder, self.cfg = table, encoder, cfg
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = cfg.batch_size // process_count
        self._feed = Prefetcher(self._produce, self._initial_state(), cfg.prefetch)

    # -- production --------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"batch_size": self.cfg.batch_size}

    def _produce(self, start: dict[str, Any]) -> Iterator[tuple[Batch, dict, DataStats]]:
        epoch, window, emitted = start["epoch"], start["window"], start["emitted"]
        carry_ids = [list(b) for b in start["carry"]]
        stats = stats_from_state(start["stats"])
        w, b = self.cfg.pack_window, self.local_batch
        num_epochs = self.cfg.num_epochs
        if num_epochs is None and not len(self._epoch_rows(0)):
            raise DataError(
                "the data split has no rows for this process; add rows or use fewer processes"
            )
        carried = self._reread(carry_ids)  # on a resume, from their ids; then kept in memory
        while num_epochs is None or epoch < num_epochs:
            order = self._epoch_rows(epoch)
            while window * w < len(order):
                window_stats = stats_state(stats)
                rows_read = self.table.read(order[window * w : (window + 1) * w])
                examples: list[Example] = self.encoder.encode(rows_read, stats)  # type: ignore[assignment]
                rows = carried + self._bins(examples, epoch, window)
                full = len(rows) // b
                for j in range(emitted, full):
                    state = self._snapshot(epoch, window, j + 1, carry_ids, window_stats)
                    yield self._batch(rows[j * b : (j + 1) * b]), state, stats.copy()
                carried = rows[full * b :]
                carry_ids = [[ex.gid for ex in row] for row in carried]
                window, emitted = window + 1, 0
            epoch, window = epoch + 1, 0
        if carried:
            state = self._snapshot(epoch, 0, 0, [], stats_state(stats))
            yield self._batch(carried), state, stats.copy()

    def _bins(self, examples: list[Example], epoch: int, window: int) -> list[list[Example]]:
        if not self.cfg.pack:
            return [[ex] for ex in examples]
        bins = best_fit_decreasing([len(ex.ids) for ex in examples], self.cfg.seq_len)
        if self.cfg.shuffle:  # BFD emits the longest examples first; spread them over the window
            rng = np.random.default_rng([self.cfg.seed, epoch, window, self.process_index])
            bins = [bins[i] for i in rng.permutation(len(bins))]
        return [[examples[i] for i in members] for members in bins]

    def _reread(self, carry_ids: list[list[int]]) -> list[list[Example]]:
        """Rebuild carried rows from their row ids (they were valid when first encoded)."""
        by_gid = reread(self.table, self.encoder, [gid for row in carry_ids for gid in row])
        return [[by_gid[gid] for gid in row] for row in carry_ids]  # type: ignore[misc]

    def _batch(self, rows: Sequence[list[Example]]) -> Batch:
        examples = [(ex.ids, ex.mask) for row in rows for ex in row]
        bins, k = [], 0
        for row in rows:
            bins.append(list(range(k, k + len(row))))
            k += len(row)
        return pack_rows(
            examples, bins, self.cfg.seq_len, self.encoder.pad_id, n_rows=self.local_batch
        )


# -- shared with the preference batcher (jaxft.data.preference) --------------------------------

Produced = tuple[dict[str, np.ndarray], dict[str, Any], DataStats]


class Prefetcher:
    """Hands out the batches of ``produce(state)``, a generator of ``(batch, state after it,
    stats after it)``, and keeps the state and stats of the last batch handed out.

    With ``depth`` 0 the generator runs on the caller's thread; otherwise a background thread
    keeps up to ``depth`` batches ready. An exception raised while producing reaches the caller
    at the batch where it happened; the thread is stopped and joined by ``close()``.
    """

    def __init__(
        self, produce: Callable[[dict[str, Any]], Iterator[Produced]], state: dict, depth: int
    ) -> None:
        self._produce, self._depth = produce, depth
        self.state, self.stats = state, stats_from_state(state["stats"])
        self._gen: Iterator | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._done = False

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        if self._depth == 0:
            if self._gen is None:
                self._gen = self._produce(self.state)
            item = next(self._gen, _END)
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()  # type: ignore[union-attr]
        if item is _END:
            self._done = True
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            self.close()
            raise item
        batch, self.state, self.stats = item
        return batch

    def restart(self, state: dict[str, Any]) -> None:
        """Produce from ``state`` on (the next batch is the one after it)."""
        self.close()
        self.state, self.stats = state, stats_from_state(state["stats"])
        self._done, self._stop = False, threading.Event()

    def close(self) -> None:
        """Stop and join the prefetch thread; safe to call more than once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread, self._queue, self._gen = None, None, None

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._depth)
        self._thread = threading.Thread(
            target=self._worker,
            name="jaxft-data-prefetch",
            args=(self._produce(self.state), self._queue, self._stop),
            daemon=True,
        )
        self._thread.start()

    @staticmethod
    def _worker(gen: Iterator, q: queue.Queue, stop: threading.Event) -> None:
        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for item in gen:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)


def check_state(state: dict[str, Any], expected: dict[str, Any], keys: Sequence[str]) -> None:
    """Raise ``DataError`` naming the first of ``keys`` where a saved iterator state differs
    from what the data and settings give now."""
    for key in keys:
        got = state.get(key)
        got = list(got) if isinstance(got, tuple) else got
        if got != expected[key]:
            raise DataError(
                f"the data iterator state was saved with {key}={got!r} but the "
                f"data now gives {key}={expected[key]!r}: resume with the same "
                "data files and data settings (or start a new run)"
            )


def epoch_rows(
    row_ids: np.ndarray, cfg: DataConfig, epoch: int, process_index: int, process_count: int
) -> np.ndarray:
    """The row ids process ``process_index`` reads in ``epoch``: every ``process_count``-th
    row of the split's order for that epoch (permuted from ``(seed, epoch)`` when shuffling)."""
    ids = row_ids
    if cfg.shuffle:
        ids = ids[np.random.default_rng([cfg.seed, epoch]).permutation(len(ids))]
    return ids[process_index::process_count]


def reread(table: RowTable, encoder: Encoder, gids: Sequence[int]) -> dict[int, AnyExample]:
    """Examples of rows already encoded once (carried over a window), by row id; the counters
    are not touched (the rows were counted when first read)."""
    if not len(gids):
        return {}
    return {ex.gid: ex for ex in encoder.encode(table.read(list(gids)), DataStats())}


def stats_state(stats: DataStats) -> dict[str, Any]:
    """Counters as they go into an iterator state (JSON, without the sample messages)."""
    d = stats.to_dict()
    d.pop("skip_samples")
    return d


def stats_from_state(d: dict[str, Any]) -> DataStats:
    return DataStats(
        d["rows"],
        d["examples"],
        d["tokens"],
        d["trained_tokens"],
        d["truncated"],
        Counter(d["dropped"]),
        Counter(d["skipped"]),
    )


def open_splits(
    cfg: DataConfig,
) -> tuple[tuple[RowTable, np.ndarray], tuple[RowTable, np.ndarray] | None]:
    """``(table, row ids)`` of the train split and of the validation split (None without one).

    A held-out validation fraction shares the train table; its rows are left out of train.
    """
    if not cfg.train:
        raise DataError("data.train is empty: list the training files (paths or globs)")
    table = RowTable(open_sources(cfg.train, tfds_data_dir=cfg.tfds_data_dir), cfg.format)
    if cfg.validation:
        sources = open_sources(
            cfg.validation, key="data.validation", tfds_data_dir=cfg.tfds_data_dir
        )
        val_table = RowTable(sources, cfg.format)
        return (table, np.arange(len(table))), (val_table, np.arange(len(val_table)))
    if cfg.validation_fraction > 0:
        train_ids, val_ids = split_validation(len(table), cfg.validation_fraction, cfg.seed)
        return (table, train_ids), (table, val_ids)
    return (table, np.arange(len(table))), None


def open_split(cfg: DataConfig, split: str = "train") -> tuple[RowTable, np.ndarray]:
    """``(table, row ids)`` of ``split``: "train" or "validation"."""
    train, validation = open_splits(cfg)
    if split == "train":
        return train
    if validation is None:
        raise DataError("no validation split: set data.validation or data.validation_fraction")
    return validation


def iter_examples(
    cfg: DataConfig, tokenizer: Any, split: str = "train", stats: DataStats | None = None
) -> Iterator[AnyExample]:
    """Every example of a split in row order, for any row family (preference and KTO rows
    included, for their own batchers); ``stats`` collects the counters."""
    table, row_ids = open_split(cfg, split)
    encoder, stats = Encoder(cfg, tokenizer), stats if stats is not None else DataStats()
    for start in range(0, len(row_ids), cfg.pack_window):
        yield from encoder.encode(table.read(row_ids[start : start + cfg.pack_window]), stats)


def build_iterators(
    cfg: DataConfig, tokenizer: Any, *, process_index: int = 0, process_count: int = 1
) -> tuple[BatchIterator, BatchIterator | None]:
    """Train and validation iterators for an SFT run (validation: one pass, in order).

    Pass ``jax.process_index()`` and ``jax.process_count()`` in a multi-process run.
    """
    encoder = Encoder(cfg, tokenizer)
    (table, ids), val = open_splits(cfg)
    train = BatchIterator(
        table, encoder, cfg, ids, process_index=process_index, process_count=process_count
    )
    if val is None:
        return train, None
    val_cfg = cfg.model_copy(update={"shuffle": False, "num_epochs": 1})
    validation = BatchIterator(
        val[0], encoder, val_cfg, val[1], process_index=process_index, process_count=process_count
    )
    return train, validation
