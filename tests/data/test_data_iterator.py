"""The batch iterator: determinism, epochs, resume in a new process, process slices, prefetch."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from data_helpers import assert_same_batches, chat, segments, take

from jaxft.data import DataConfig, DataStats, Encoder, build_iterators
from jaxft.data.sources import RowTable, open_sources
from jaxft.errors import DataError

WORKER = os.path.join(os.path.dirname(__file__), "iter_worker.py")
BASE = {"seq_len": 256, "batch_size": 4, "pack_window": 64, "seed": 3, "prefetch": 2}


@pytest.fixture
def rows_path(write_jsonl):
    return write_jsonl([chat(i, turns=1 + i % 3) for i in range(300)])


def _cfg(path, **kw):
    return DataConfig(train=path, **{**BASE, **kw})


def _all_examples(cfg, tokenizer):
    """Every row encoded on its own: token tuple -> row id."""
    table = RowTable(open_sources(cfg.train), cfg.format)
    examples = Encoder(cfg, tokenizer).encode(table.read(range(len(table))), DataStats())
    return {tuple(ex.ids.tolist()): ex.gid for ex in examples}


def _rows_seen(batches, by_tokens):
    return [by_tokens[s] for b in batches for s in segments(b)]


def test_one_epoch_sees_every_row_once_deterministically(rows_path, tokenizer):
    cfg = _cfg(rows_path)
    batches = take(build_iterators(cfg, tokenizer)[0])
    seen = _rows_seen(batches, _all_examples(cfg, tokenizer))
    assert sorted(seen) == list(range(300))
    assert all(b["tokens"].shape == (4, 256) and b["tokens"].dtype == np.int32 for b in batches)
    assert_same_batches(batches, take(build_iterators(cfg, tokenizer)[0]))
    other = take(build_iterators(_cfg(rows_path, seed=4), tokenizer)[0])
    assert sorted(_rows_seen(other, _all_examples(cfg, tokenizer))) == list(range(300))
    assert _rows_seen(other, _all_examples(cfg, tokenizer)) != seen


def test_epochs_reshuffle(rows_path, tokenizer):
    cfg = _cfg(rows_path, num_epochs=2, pack=False, batch_size=10)
    seen = _rows_seen(take(build_iterators(cfg, tokenizer)[0]), _all_examples(cfg, tokenizer))
    assert len(seen) == 600 and collections.Counter(seen) == {i: 2 for i in range(300)}
    assert seen[:300] != seen[300:]


def test_restore_at_every_batch_gives_the_same_continuation(rows_path, tokenizer):
    cfg = _cfg(rows_path, num_epochs=2, prefetch=0)
    it = build_iterators(cfg, tokenizer)[0]
    states, batches = [it.state()], []
    for b in it:
        batches.append(b)
        states.append(json.loads(json.dumps(it.state())))  # through JSON, as a checkpoint would
    assert any(s["carry"] for s in states) and any(s["epoch"] == 1 for s in states)
    for k in range(0, len(batches) + 1, 3):
        fresh = build_iterators(cfg, tokenizer)[0]
        fresh.restore(states[k])
        assert_same_batches(take(fresh, 2), batches[k : k + 2])


def test_resume_in_a_new_process(rows_path, tokenizer, tokenizer_dir, tmp_path):
    cfg = _cfg(rows_path, num_epochs=2)
    it = build_iterators(cfg, tokenizer)[0]
    with it:
        for k, _ in enumerate(it, start=1):  # stop where rows are carried across windows
            state = it.state()
            if state["carry"] and k > 5:
                break
        rest = list(it)  # everything after the saved point: both epochs and the last batch
    (tmp_path / "state.json").write_text(json.dumps(state))
    out = str(tmp_path / "resumed.npz")
    subprocess.run(
        [
            sys.executable,
            WORKER,
            json.dumps(cfg.model_dump()),
            tokenizer_dir,
            out,
            "--restore",
            str(tmp_path / "state.json"),
        ],
        check=True,
        timeout=300,
    )
    with np.load(out) as z:
        resumed = [{f: z[f"{i}/{f}"] for f in rest[0]} for i in range(len(z.files) // 5)]
    assert len(rest) > 10
    assert_same_batches(resumed, rest)


def test_two_processes_read_disjoint_slices_covering_the_epoch(
    rows_path, tokenizer, tokenizer_dir, tmp_path
):
    cfg = _cfg(rows_path, batch_size=8)
    procs, outs = [], []
    for p in range(2):
        outs.append(str(tmp_path / f"p{p}.npz"))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    WORKER,
                    json.dumps(cfg.model_dump()),
                    tokenizer_dir,
                    outs[-1],
                    "--process-index",
                    str(p),
                    "--process-count",
                    "2",
                ]
            )
        )
    assert all(proc.wait(timeout=300) == 0 for proc in procs)
    by_tokens = _all_examples(cfg, tokenizer)
    slices = []
    for out in outs:
        with np.load(out) as z:
            n = len(z.files) // 5
            batches = [{f: z[f"{i}/{f}"] for f in ("tokens", "segment_ids")} for i in range(n)]
        assert all(b["tokens"].shape == (4, 256) for b in batches)  # 8 rows / 2 processes
        slices.append(_rows_seen(batches, by_tokens))
    a, b = set(slices[0]), set(slices[1])
    assert not a & b
    assert sorted(slices[0] + slices[1]) == list(range(300))
    assert abs(len(a) - len(b)) <= 1


def test_prefetch_thread_is_shut_down(rows_path, tokenizer):
    def prefetchers():
        return [t for t in threading.enumerate() if t.name == "jaxft-data-prefetch"]

    it = build_iterators(_cfg(rows_path, prefetch=3), tokenizer)[0]
    next(it)
    assert prefetchers()
    it.close()
    assert not prefetchers()
    with build_iterators(_cfg(rows_path), tokenizer)[0] as it2:
        next(it2)
    assert not prefetchers()


def test_a_bad_row_in_the_prefetch_thread_reaches_the_caller(write_jsonl, tokenizer):
    rows = [chat(i) for i in range(200)]
    rows[149] = {"messages": [{"role": "user", "content": ""}]}
    cfg = _cfg(write_jsonl(rows), shuffle=False)
    it = build_iterators(cfg, tokenizer)[0]
    with pytest.raises(DataError, match=r"rows.jsonl:150: field 'messages\[0\].content': is empty"):
        list(it)
    assert not [t for t in threading.enumerate() if t.name == "jaxft-data-prefetch"]


def test_state_is_small_and_checked_on_restore(rows_path, tokenizer):
    it = build_iterators(_cfg(rows_path), tokenizer)[0]
    take(it, 7)
    state = it.state()
    assert len(json.dumps(state)) < 2000
    other = build_iterators(_cfg(rows_path, seq_len=512), tokenizer)[0]
    with pytest.raises(DataError, match="seq_len=256 but the data now gives seq_len=512"):
        other.restore(state)


def test_held_out_validation_is_disjoint_from_train(rows_path, tokenizer):
    cfg = _cfg(rows_path, validation_fraction=0.1, pack=False, batch_size=5)
    train, val = build_iterators(cfg, tokenizer)
    by_tokens = _all_examples(_cfg(rows_path), tokenizer)
    t = _rows_seen(take(train), by_tokens)
    val_batches = take(val)
    v = _rows_seen(val_batches, by_tokens)
    assert len(v) == 30 and not set(t) & set(v) and sorted(t + v) == list(range(300))
    assert v == sorted(v)  # validation: one pass, in order
    val.reset()  # the next evaluation pass sees the same batches
    assert_same_batches(take(val), val_batches)


def test_packing_off_gives_one_padded_example_per_row(rows_path, tokenizer):
    batches = take(build_iterators(_cfg(rows_path, pack=False), tokenizer)[0])
    assert all(((b["segment_ids"] <= 1).all()) for b in batches)
    assert sum(int((b["segment_ids"].max(axis=1) == 1).sum()) for b in batches) == 300


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_rows_are_counted(rows_path, tokenizer, overlong):
    cfg = _cfg(rows_path, seq_len=96, overlong=overlong)
    lengths = [len(t) for t in _all_examples(_cfg(rows_path), tokenizer)]
    n_long = sum(n > 96 for n in lengths)
    it = build_iterators(cfg, tokenizer)[0]
    batches = take(it)
    stats = it.stats
    assert n_long > 0 and stats.rows == 300
    n_segments = sum(len(segments(b)) for b in batches)
    if overlong == "truncate":
        # a truncated row keeps trained tokens or is dropped for having none left: both counted
        assert stats.truncated + stats.dropped["no_trained_token_within_seq_len"] == n_long
        assert n_segments == stats.examples == 300 - sum(stats.dropped.values())
    else:
        assert stats.dropped == {"overlong": n_long} and n_segments == 300 - n_long
