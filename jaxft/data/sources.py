"""Row sources: local files and saved datasets, indexed so that any subset of rows can be read.

Every source has a length and reads rows by index, so a process reads only its own slice and a
resumed run re-reads only what it needs. JSON lines are indexed by their byte offsets (the file is
scanned for newlines once, not parsed); parquet, CSV and ``save_to_disk`` directories are read
through ``datasets`` (memory-mapped Arrow); TFDS datasets through ``tfds.data_source``.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxft.data.rows import FAMILY, Parsed, RowError, detect_format, parse_row
from jaxft.errors import DataError

_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class RowRef:
    """Where a row lives: ``index`` is 0-based within its source, ``line`` 1-based when known."""

    path: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else f"{self.path}, row index {self.index}"


@dataclass(frozen=True, slots=True)
class Row:
    """A row as read: its global index, where it came from, and its value or what is wrong."""

    gid: int
    ref: RowRef
    value: Parsed | RowError


class _Source:
    path: str

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, indices: Sequence[int]) -> list[tuple[RowRef, Any]]:
        """The rows at ``indices`` as Python objects, or a ``RowError`` for unreadable ones."""
        raise NotImplementedError


class JsonLinesSource(_Source):
    """A JSON-lines file, memory-mapped and indexed by line; blank lines are not rows."""

    def __init__(self, path: str) -> None:
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._starts, self._ends, self._lines = _index_lines(self._mm)

    def __len__(self) -> int:
        return len(self._starts)

    def raw(self, indices: Sequence[int]) -> list[tuple[RowRef, Any]]:
        out = []
        for i in indices:
            line = int(self._lines[i])
            data = self._mm[self._starts[i] : self._ends[i]]
            out.append((RowRef(self.path, int(i), line), _decode_line(data)))
        return out


def _index_lines(buf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte ranges and 1-based line numbers of the non-blank lines of ``buf``."""
    data = np.frombuffer(buf, dtype=np.uint8) if len(buf) else np.zeros(0, np.uint8)
    chunk = 1 << 26  # scan 64 MiB at a time: a huge file never needs a file-sized mask
    newlines = [np.flatnonzero(data[o : o + chunk] == 10) + o for o in range(0, len(data), chunk)]
    newlines = np.concatenate([np.zeros(0, np.int64), *newlines])
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(data)]])
    lines = np.arange(1, len(starts) + 1)
    keep = ends > starts
    # A blank line starts with whitespace; only those few are looked at closely.
    maybe_blank = np.flatnonzero(keep)
    maybe_blank = maybe_blank[np.isin(data[starts[maybe_blank]], (9, 13, 32))]
    keep[maybe_blank] = [bool(bytes(data[starts[j] : ends[j]]).strip()) for j in maybe_blank]
    return starts[keep], ends[keep], lines[keep]


def _decode_line(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError(
            None,
            f"invalid UTF-8 at byte offset {e.start} of the line ({e.reason}); "
            "re-encode the file as UTF-8",
            "invalid_utf8",
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RowError(None, f"malformed JSON at column {e.colno}: {e.msg}", "malformed_json")


class JsonArraySource(_Source):
    """A ``.json`` file holding one array of row objects (parsed whole)."""

    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(
                f"{path}:{line}: invalid UTF-8 ({e.reason}): re-encode the file as UTF-8"
            ) from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON at column {e.colno}: {e.msg}. "
                "Fix the file (a whole-file JSON array cannot skip a bad row; JSON "
                "lines can)"
            ) from None
        if not isinstance(rows, list):
            raise DataError(
                f"{path}: expected a JSON array of rows or JSON lines, got a {type(rows).__name__}"
            )
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def raw(self, indices: Sequence[int]) -> list[tuple[RowRef, Any]]:
        return [(RowRef(self.path, int(i)), self._rows[i]) for i in indices]


class ArrowSource(_Source):
    """A ``datasets.Dataset`` (parquet, CSV or ``save_to_disk``), memory-mapped."""

    def __init__(self, path: str, dataset: Any) -> None:
        self.path, self._ds = path, dataset

    def __len__(self) -> int:
        return len(self._ds)

    def raw(self, indices: Sequence[int]) -> list[tuple[RowRef, Any]]:
        if not len(indices):
            return []
        cols = self._ds[[int(i) for i in indices]]
        names = list(cols)
        values = [dict(zip(names, vals)) for vals in zip(*(cols[n] for n in names))]
        return [(RowRef(self.path, int(i)), v) for i, v in zip(indices, values)]


class TfdsSource(_Source):
    """A prepared TFDS dataset (``array_record`` or ``parquet``), read with ``tfds.data_source``."""

    def __init__(self, spec: str, data_dir: str | None) -> None:
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DataError(
                f"{spec}: TFDS sources need tensorflow-datasets: pip install 'jaxft[tfds]'"
            ) from None
        name, _, split = spec.removeprefix("tfds:").partition("#")
        self.path = spec
        try:
            self._src = tfds.data_source(name, split=split or "train", data_dir=data_dir)
        except Exception as e:  # tfds raises many types; all mean the dataset is not there
            raise DataError(
                f"{spec}: cannot open the TFDS dataset ({e}); prepare it with "
                "download_and_prepare(file_format='array_record') or set "
                "data.tfds_data_dir"
            ) from None

    def __len__(self) -> int:
        return len(self._src)

    def raw(self, indices: Sequence[int]) -> list[tuple[RowRef, Any]]:
        return [(RowRef(self.path, int(i)), _from_tfds(self._src[int(i)])) for i in indices]


def _from_tfds(value: Any) -> Any:
    """TFDS yields bytes and numpy arrays; rows are made of str, bool, lists and dicts."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            return RowError(None, f"invalid UTF-8 in a string ({e.reason})", "invalid_utf8")
    if isinstance(value, dict):
        return {k: _from_tfds(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_from_tfds(v) for v in value.tolist()] if value.ndim else _from_tfds(value.item())
    if isinstance(value, (list, tuple)):
        return [_from_tfds(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def open_sources(
    patterns: Sequence[str], *, key: str = "data.train", tfds_data_dir: str | None = None
) -> list[_Source]:
    """Open every file or dataset that ``patterns`` name; a pattern matching nothing is an error."""
    sources: list[_Source] = []
    for pattern in patterns:
        if pattern.startswith("tfds:"):
            sources.append(TfdsSource(pattern, tfds_data_dir))
            continue
        path, _, split = pattern.partition("#")
        matches = sorted(glob.glob(os.path.expanduser(path)))
        if not matches:
            raise DataError(
                f"{key}: no file matches '{pattern}' (working directory "
                f"{os.getcwd()}): check the path"
            )
        for match in matches:
            sources.extend(_open_path(match, split))
    return sources


def _open_path(path: str, split: str) -> list[_Source]:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
            os.path.join(path, "state.json")
        ):
            return [_open_saved(path, split)]
        files = sorted(
            f
            for f in glob.glob(os.path.join(path, "*"))
            if _kind(f) is not None and os.path.isfile(f)
        )
        if not files:
            raise DataError(
                f"{path}: the directory holds no .jsonl, .json, .parquet or .csv "
                "file and no datasets.save_to_disk dataset"
            )
        return [s for f in files for s in _open_path(f, split)]
    kind = _kind(path)
    if kind is None:
        raise DataError(
            f"{path}: unknown file type; use .jsonl, .json, .parquet, .csv or a "
            "datasets.save_to_disk directory"
        )
    if kind == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            with open(path, "rb") as f:
                return [JsonArraySource(path, f.read())]
        return [JsonLinesSource(path)]
    import datasets

    reader = datasets.Dataset.from_parquet if kind == "parquet" else datasets.Dataset.from_csv
    try:
        return [ArrowSource(path, reader(path))]
    except Exception as e:  # pyarrow / datasets errors: the file cannot be read at all
        raise DataError(f"{path}: cannot read the {kind} file ({type(e).__name__}: {e})") from None


def _open_saved(path: str, split: str) -> _Source:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if not split:
            if len(ds) != 1 and "train" not in ds:
                raise DataError(
                    f"{path}: the saved DatasetDict has splits {sorted(ds)}; pick "
                    f"one with '{path}#SPLIT'"
                )
            split = "train" if "train" in ds else next(iter(ds))
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (the dataset has {sorted(ds)})")
        return ArrowSource(f"{path}#{split}", ds[split])
    return ArrowSource(path, ds)


def _kind(path: str) -> str | None:
    return _FILE_KINDS.get(os.path.splitext(path)[1].lower())


class RowTable:
    """Several sources behind one 0-based global row index; rows come back parsed.

    ``fmt`` is a row format, or "auto" to take each source's format from its first readable row.
    All sources must belong to one family (SFT, preference or KTO).
    """

    def __init__(self, sources: Sequence[_Source], fmt: str = "auto") -> None:
        self.sources = list(sources)
        self._bounds = np.cumsum([0] + [len(s) for s in self.sources])
        self.formats = [fmt if fmt != "auto" else _detect(s) for s in self.sources]
        families = {FAMILY[f] for f in self.formats}
        if len(families) > 1:
            found = ", ".join(f"{s.path}: {f}" for s, f in zip(self.sources, self.formats))
            raise DataError(
                f"sources mix row families ({found}); SFT, preference and KTO rows "
                "need separate runs"
            )

    @property
    def family(self) -> str:
        return FAMILY[self.formats[0]] if self.formats else "sft"

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def read(self, gids: Sequence[int]) -> list[Row]:
        """Rows at the global indices ``gids``, in that order."""
        gids = np.asarray(gids, dtype=np.int64)
        which = np.searchsorted(self._bounds, gids, side="right") - 1
        out: list[Row | None] = [None] * len(gids)
        for s in np.unique(which):
            pos = np.flatnonzero(which == s)
            local = gids[pos] - self._bounds[s]
            for p, (ref, raw) in zip(pos, self.sources[s].raw(local)):
                out[p] = Row(int(gids[p]), ref, _parse(raw, self.formats[s]))
        return out  # type: ignore[return-value]


def _parse(raw: Any, fmt: str) -> Parsed | RowError:
    if isinstance(raw, RowError):
        return raw
    try:
        return parse_row(raw, fmt)
    except RowError as e:
        return e


def _detect(source: _Source, probe: int = 64) -> str:
    seen: list[str] = []
    for _, raw in source.raw(range(min(probe, len(source)))):
        fmt = detect_format(raw)
        if fmt is not None:
            return fmt
        if isinstance(raw, dict):
            seen.append(str(sorted(raw)))
    if not len(source):
        return "messages"  # an empty file contributes no rows; any format will do
    keys = f" (rows have the fields {seen[0]})" if seen else ""
    raise DataError(
        f"{source.path}: cannot tell the row format from the first rows{keys}; "
        "expected 'messages', 'prompt'+'completion', 'text', "
        "'prompt'+'chosen'+'rejected' or 'prompt'+'completion'+'label', or set "
        "data.format"
    )


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted train and validation row indices, the validation share held out at random."""
    if fraction <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    k = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])
