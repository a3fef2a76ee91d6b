"""Packing examples into fixed-length rows with isolated segments.

A packed row holds several examples one after another. ``segment_ids`` numbers them 1, 2, ... (0 is
padding) and ``positions`` restart at 0 for each, so attention that is causal *and* within a
segment, with RoPE on ``positions``, sees every example exactly as if it were alone. Targets are the
next token within the same segment: the last token of a segment has no target (``loss_mask`` 0),
so no example learns to predict the first token of the next one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Int

Batch = dict[str, Int[np.ndarray, "rows seq"]]
FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items by length descending, each into the fullest bin it fits.

    Best-fit decreasing (Johnson 1973, as in SPECS section 5). Ties go to the earlier item and the
    earlier bin, so the result depends only on ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    room: list[tuple[int, int]] = []  # (free space, bin) sorted: the first fit is the fullest
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit in {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            b, free = len(bins) - 1, capacity - n
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, b))
    return bins


def pack_rows(
    examples: Sequence[tuple[np.ndarray, np.ndarray]],
    bins: Sequence[Sequence[int]],
    seq_len: int,
    pad_id: int,
    n_rows: int | None = None,
) -> Batch:
    """Lay out ``bins`` (lists of indices into ``examples``) as rows of ``seq_len`` tokens.

    ``examples`` are ``(ids, mask)`` pairs, ``mask`` per token (True = trained token). Rows past
    ``len(bins)`` up to ``n_rows`` are all padding.
    """
    n_rows = len(bins) if n_rows is None else n_rows
    tokens = np.full((n_rows, seq_len), pad_id, dtype=np.int32)
    trained = np.zeros((n_rows, seq_len), dtype=bool)
    segment_ids = np.zeros((n_rows, seq_len), dtype=np.int32)
    positions = np.zeros((n_rows, seq_len), dtype=np.int32)
    arange = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(bins):
        at = 0
        for s, j in enumerate(members, start=1):
            ids, mask = examples[j]
            n = len(ids)
            if at + n > seq_len:
                raise ValueError(f"row {r} holds {at + n} tokens, more than seq_len={seq_len}")
            tokens[r, at : at + n] = ids
            trained[r, at : at + n] = mask
            segment_ids[r, at : at + n] = s
            positions[r, at : at + n] = arange[:n]
            at += n
    # Target of token t is token t+1 of the same segment; a segment's last token has none.
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    targets = np.full_like(tokens, pad_id)
    targets[:, :-1] = np.where(same, tokens[:, 1:], pad_id)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, :-1] = same & trained[:, 1:]
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def pack(
    examples: Sequence[tuple[Int[np.ndarray, " L"], Bool[np.ndarray, " L"]]],
    seq_len: int,
    pad_id: int,
    *,
    packed: bool = True,
) -> Batch:
    """Pack ``(ids, mask)`` examples into rows of ``seq_len`` tokens (best-fit decreasing).

    Returns int32 arrays ``[rows, seq_len]``: ``tokens``, ``targets`` (next token within the
    segment), ``loss_mask`` (1 where the target is a trained token), ``segment_ids`` (1.. per
    example, 0 = padding) and ``positions`` (restarting at 0 per example). ``packed=False`` gives
    one example per row, padded. Examples longer than ``seq_len`` are an error: truncate or drop
    them first (the loader does, by ``data.overlong``). The layout matches what TRL's
    ``padding_free`` packing feeds a model through ``position_ids``, with explicit segment ids.
    """
    if packed:
        bins = best_fit_decreasing([len(ids) for ids, _ in examples], seq_len)
    else:
        bins = [[i] for i in range(len(examples))]
    return pack_rows(examples, bins, seq_len, pad_id)


def packing_efficiency(batch: Batch) -> float:
    """Share of token slots holding a real token rather than padding."""
    return float((batch["segment_ids"] > 0).mean()) if batch["segment_ids"].size else 0.0
