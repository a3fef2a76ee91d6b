"""Helpers shared by the data tests (imported by name; tests/data is on sys.path)."""

from __future__ import annotations

import itertools

import numpy as np


def chat(i: int, turns: int = 1) -> dict:
    """A small distinct conversation (row ``i``)."""
    messages = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {i} part {t} kato rimu?"})
        messages.append(
            {"role": "assistant", "content": f"Answer {i}.{t}: senlo pavi " * (1 + i % 5)}
        )
    return {"messages": messages}


def segments(batch) -> list[tuple[int, ...]]:
    """The token sequence of every segment of a packed batch, row by row."""
    import numpy as np

    out = []
    for toks, seg in zip(batch["tokens"], batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            out.append(tuple(int(t) for t in toks[seg == s]))
    return out


def take(it, n=None) -> list[dict]:
    """The first ``n`` batches (all when ``None``) of an iterator, closing it afterwards."""
    with it:
        return list(it if n is None else itertools.islice(it, n))


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
