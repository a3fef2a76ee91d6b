"""Packing: best-fit decreasing, segment isolation, nothing lost, efficiency on skewed lengths."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxft.data import best_fit_decreasing, pack, packing_efficiency

PAD = 0


@st.composite
def examples_and_len(draw):
    seq_len = draw(st.integers(2, 48))
    n = draw(st.integers(0, 30))
    out = []
    for _ in range(n):
        length = draw(st.integers(1, seq_len))
        ids = np.array(
            draw(st.lists(st.integers(1, 50), min_size=length, max_size=length)), dtype=np.int32
        )
        mask = np.array(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
        out.append((ids, mask))
    return out, seq_len


def _reference_bfd(lengths, capacity):
    """Best-fit decreasing written the slow, obvious way (SPECS section 5)."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))  # the fullest bin that still has room
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def _unpack(batch):
    """Examples back out of a packed batch, checking the layout of every row on the way."""
    found = []
    for r in range(batch["tokens"].shape[0]):
        tokens, targets, loss, seg, pos = (
            batch[k][r] for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
        )
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (tokens[used:] == PAD).all()  # padding at the end
        assert (loss[used:] == 0).all() and (pos[used:] == 0).all()
        ids_in_row = seg[:used]
        assert (np.diff(ids_in_row) >= 0).all() and (np.diff(ids_in_row) <= 1).all()
        assert used == 0 or ids_in_row[0] == 1
        for s in np.unique(ids_in_row):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()  # contiguous
            assert pos[where].tolist() == list(range(len(where)))  # positions restart
            # targets: the next token of the same segment, none after the last
            assert targets[where[:-1]].tolist() == tokens[where[1:]].tolist()
            assert loss[where[-1]] == 0 and targets[where[-1]] == PAD
            found.append((tokens[where].tolist(), loss[where]))
    return found


@settings(max_examples=150, deadline=None)
@given(examples_and_len(), st.booleans())
def test_packing_loses_nothing_and_never_crosses_segments(data, packed):
    examples, seq_len = data
    batch = pack(examples, seq_len, PAD, packed=packed)
    assert all(
        v.dtype == np.int32 and v.shape == (len(batch["tokens"]), seq_len) for v in batch.values()
    )
    found = _unpack(batch)
    # every example exactly once, intact
    assert sorted(t for t, _ in found) == sorted(ids.tolist() for ids, _ in examples)
    # loss_mask sums equal the unpacked ones: token t+1 trained <=> target of t trained
    assert int(batch["loss_mask"].sum()) == sum(int(m[1:].sum()) for _, m in examples)
    by_tokens = {}
    for ids, mask in examples:
        by_tokens.setdefault(tuple(ids.tolist()), []).append(mask[1:].astype(int).tolist() + [0])
    for tokens, loss in found:
        assert loss.tolist() in by_tokens[tuple(tokens)]
    if not packed:
        assert len(batch["tokens"]) == len(examples)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 64).flatmap(
        lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))
    )
)
def test_best_fit_decreasing_matches_the_reference(case):
    capacity, lengths = case
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == _reference_bfd(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_best_fit_picks_the_fullest_bin():
    # 6 -> A (4 free), 5 -> B (5 free), 4 -> A (fullest that fits: 0 free), 3 -> B, 2 -> B
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    # 8 -> A (2 free), 6 -> B (4 free), 3 -> B (1 free); first fit would put the 1 into A,
    # best fit into B, the fullest bin that has room
    assert best_fit_decreasing([8, 6, 3, 1], 10) == [[0], [1, 2, 3]]


def test_packing_efficiency_on_a_skewed_distribution():
    """Many short examples, a long tail up to seq_len: BFD fills >= 95% of the slots."""
    rng = np.random.default_rng(0)
    seq_len = 2048
    lengths = np.clip(rng.lognormal(mean=5.0, sigma=1.1, size=4000), 8, seq_len).astype(int)
    examples = [(np.ones(n, np.int32), np.ones(n, bool)) for n in lengths]
    packed = packing_efficiency(pack(examples, seq_len, PAD))
    padded = packing_efficiency(pack(examples, seq_len, PAD, packed=False))
    print(
        f"skewed lengths (mean {lengths.mean():.0f}, max {lengths.max()}): packed "
        f"{packed:.1%}, padded {padded:.1%}"
    )
    assert packed >= 0.95
    assert padded < 0.15  # what padding alone gives
