"""Preference and KTO batches: layout token by token, packing, whole pairs, TRL's KL pairs,
resume, process slices, overlong rows."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import random
import re
import threading

import numpy as np
import pytest
from data_helpers import assert_same_batches, take

from jaxft.data import (
    DataConfig,
    DataStats,
    Encoder,
    PreferenceIterator,
    build_preference_iterators,
)
from jaxft.data.encode import Example, fit_completions
from jaxft.data.iterator import open_splits
from jaxft.data.synthetic import Words
from jaxft.errors import DataError


def _pair_rows(n: int, seed: int = 0, most: int = 30) -> list[dict]:
    words, rng = Words(seed), random.Random(seed)
    return [
        {
            "prompt": f"Question {i}: " + words.passage(rng.randint(2, most)),
            "chosen": words.passage(rng.randint(2, most)),
            "rejected": words.passage(rng.randint(2, most)),
        }
        for i in range(n)
    ]


def _kto_rows(n: int, seed: int = 0) -> list[dict]:
    words, rng = Words(seed), random.Random(seed)
    return [
        {
            "prompt": f"Question {i}: " + words.passage(rng.randint(2, 20)),
            "completion": words.passage(rng.randint(2, 30)),
            "label": rng.random() < 0.5,
        }
        for i in range(n)
    ]


def _cfg(path: str, **kw) -> DataConfig:
    base = {"seq_len": 256, "pack_window": 16, "seed": 5, "prefetch": 0}
    return DataConfig(train=path, **{**base, **kw})


def _iterator(cfg, tokenizer, objective="pairs", batch_pairs=4, **kw) -> PreferenceIterator:
    (table, ids), _ = open_splits(cfg)
    return PreferenceIterator(
        table, Encoder(cfg, tokenizer), cfg, ids, objective=objective, batch_pairs=batch_pairs, **kw
    )


def _examples(batch) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Global example index -> (tokens, loss_mask) of every example in a batch."""
    out = {}
    for e in np.unique(batch["example_index"]):
        if e >= 0:
            sel = batch["example_index"] == e
            out[int(e)] = (
                tuple(batch["tokens"][sel].tolist()),
                tuple(batch["loss_mask"][sel].tolist()),
            )
    return out


def _pairs(batch, batch_pairs: int, offset: int = 0) -> list[tuple]:
    """(first, second) example of every unit slot the batch holds; checks that both are there."""
    ex = _examples(batch)
    used = [offset + i for i in np.flatnonzero(batch["valid"])]
    assert sorted(ex) == sorted(used + [batch_pairs + i for i in used])  # whole pairs only
    return [(ex[i], ex[batch_pairs + i]) for i in used]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_pair_batch_token_by_token(write_jsonl, tokenizer):
    rows = [
        {"prompt": "Pick one", "chosen": "Good answer.", "rejected": "Bad answer, much longer."},
        {"prompt": "Again?", "chosen": "Yes.", "rejected": "No, never again."},
    ]
    cfg = _cfg(write_jsonl(rows), seq_len=64, pack=False, shuffle=False)
    (batch,) = take(
        build_preference_iterators(cfg, tokenizer, objective="pairs", batch_pairs=2)[0]
    )
    pad, im_end = Encoder(cfg, tokenizer).pad_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert batch["tokens"].shape == (4, 64) and batch["valid"].tolist() == [1, 1]
    assert all(v.dtype == np.int32 for v in batch.values())
    # row k holds example k: chosen of pairs 0, 1, then rejected of pairs 0, 1
    for k, (row, side) in enumerate(
        [(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]
    ):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": rows[row]["prompt"]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        text = _ids(tokenizer, rows[row][side])
        ids = list(head) + text + [im_end] + _ids(tokenizer, "\n")
        n = len(ids)
        trained = [0] * len(head) + [1] * (len(text) + 1) + [0] * (n - len(head) - len(text) - 1)
        assert batch["tokens"][k].tolist() == ids + [pad] * (64 - n)
        assert batch["targets"][k].tolist() == ids[1:] + [pad] * (64 - n + 1)
        # the target of token t is token t+1: trained for the completion and its <|im_end|> only
        assert batch["loss_mask"][k].tolist() == trained[1:] + [0] * (64 - n + 1)
        assert batch["segment_ids"][k].tolist() == [1] * n + [0] * (64 - n)
        assert batch["positions"][k].tolist() == list(range(n)) + [0] * (64 - n)
        assert batch["example_index"][k].tolist() == [k] * n + [-1] * (64 - n)
        got = batch["targets"][k][batch["loss_mask"][k] == 1].tolist()
        assert tokenizer.decode(got) == rows[row][side] + "<|im_end|>"


def test_packed_and_unpacked_batches_hold_the_same_whole_pairs(write_jsonl, tokenizer):
    path = write_jsonl(_pair_rows(48))
    runs = {}
    for pack in (False, True):
        it = _iterator(_cfg(path, pack=pack, seq_len=512), tokenizer, batch_pairs=8)
        batches = take(it)
        assert all(b["tokens"].shape == (it.n_rows, 512) for b in batches)
        runs[pack] = (it.n_rows, batches)
    (r_pad, padded), (r_pack, packed) = runs[False], runs[True]
    assert r_pad == 16 and 2 <= r_pack < 8  # ~120-token examples: about four to a row
    density = [np.mean([(b["segment_ids"] > 0).mean() for b in bs]) for bs in (padded, packed)]
    assert density[1] > 2 * density[0]
    pairs = [collections.Counter(p for b in bs for p in _pairs(b, 8)) for bs in (padded, packed)]
    assert pairs[0] == pairs[1] and sum(pairs[0].values()) == 48
    for b in packed:  # segments isolate: positions restart, no target crosses into the next one
        seg, pos = b["segment_ids"], b["positions"]
        starts = (seg > 0) & np.concatenate(
            [np.ones_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], 1
        )
        assert (pos[starts] == 0).all() and (pos[(seg > 0) & ~starts] > 0).all()
        last = (seg > 0) & np.concatenate(
            [seg[:, 1:] != seg[:, :-1], np.ones_like(seg[:, :1], dtype=bool)], 1
        )
        assert (b["loss_mask"][last] == 0).all()


def test_pairs_that_do_not_fit_are_deferred_whole(write_jsonl, tokenizer):
    rows = _pair_rows(40, seed=1)
    cfg = _cfg(write_jsonl(rows), seq_len=512, num_epochs=2)
    by_tokens = {
        tuple(p.chosen.ids.tolist()): p.gid
        for p in Encoder(cfg, tokenizer).encode(_rows(cfg), DataStats())
    }
    batches = take(_iterator(cfg, tokenizer, batch_pairs=8, rows=3))
    counts = [int(b["valid"].sum()) for b in batches]
    assert all(b["tokens"].shape == (3, 512) for b in batches)
    assert min(counts) < 8 and max(counts) > 1  # pairs deferred, rows still shared
    seen = [by_tokens[chosen[0]] for b in batches for chosen, _ in _pairs(b, 8)]
    assert collections.Counter(seen) == {i: 2 for i in range(40)}  # no pair lost, none twice


def _rows(cfg):
    (table, ids), _ = open_splits(cfg)
    return table.read(ids)


def _trl_kl_rotation():
    """TRL's own expression for the KL completions of a batch, read from its source."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "trainer", "kto_trainer.py")
    with open(path, encoding="utf-8") as f:
        match = re.search(r'examples\["KL_completion_ids"\] = (.+)$', f.read(), re.MULTILINE)
    assert match, f"TRL's KL completion line moved: look at {path}"
    return lambda completions: eval(
        match.group(1), {}, {"examples": {"completion_ids": completions}}
    )


def test_kto_kl_examples_follow_trl(write_jsonl, tokenizer):
    rows = _kto_rows(3)
    cfg = _cfg(write_jsonl(rows), pack=False, shuffle=False)
    (batch,) = take(build_preference_iterators(cfg, tokenizer, objective="kto", batch_pairs=3)[0])
    assert batch["label"].tolist() == [int(r["label"]) for r in rows]
    assert batch["valid"].tolist() == [1, 1, 1] and batch["tokens"].shape == (6, 256)
    ex = _examples(batch)
    assert sorted(ex) == list(range(6))
    real = Encoder(cfg, tokenizer).encode(_rows(cfg), DataStats())
    prompts = [k.example.ids[: k.example.prompt_len].tolist() for k in real]
    completions = [k.example.ids[k.example.prompt_len :].tolist() for k in real]
    kl = [completions[2], completions[0], completions[1]]  # prompt i, completion i - 1
    for i in range(3):
        assert list(ex[i][0]) == prompts[i] + completions[i]
        assert list(ex[3 + i][0]) == prompts[i] + kl[i]
        # the KL example trains the borrowed completion's tokens, the prompt is context
        row = int(np.flatnonzero((batch["example_index"] == 3 + i).any(1))[0])
        trained = batch["targets"][row][batch["loss_mask"][row] == 1].tolist()
        assert tokenizer.decode(trained) == rows[(i - 1) % 3]["completion"] + "<|im_end|>"
    assert _trl_kl_rotation()(completions) == kl  # last: it skips where trl is not installed


@pytest.mark.parametrize("objective", ["pairs", "kto"])
def test_restore_gives_the_same_following_batches(write_jsonl, tokenizer, objective):
    rows = _pair_rows(30, seed=2) if objective == "pairs" else _kto_rows(30, seed=2)
    cfg = _cfg(write_jsonl(rows), seq_len=256, num_epochs=2, pack_window=7)
    it = _iterator(cfg, tokenizer, objective, batch_pairs=4, rows=3)
    states, batches = [it.state()], []
    for b in it:
        batches.append(b)
        states.append(json.loads(json.dumps(it.state())))  # through JSON, as a checkpoint would
    assert any(s["carry"] for s in states) and any(s["epoch"] == 1 for s in states)
    assert min(int(b["valid"].sum()) for b in batches[:-1]) < 4  # deferred units in the state
    assert states[-1]["epoch"] == 2  # the last batch comes from the end-of-run flush
    for k in range(len(batches) + 1):  # every state: mid-window, carried, deferred, the end
        fresh = _iterator(cfg.model_copy(update={"prefetch": 2}), tokenizer, objective, 4, rows=3)
        fresh.restore(states[k])
        assert_same_batches(take(fresh, 3), batches[k : k + 3])
    assert not [t for t in threading.enumerate() if t.name == "jaxft-data-prefetch"]
    it.reset()
    assert_same_batches(take(it, 2), batches[:2])
    other = _iterator(cfg.model_copy(update={"seed": 6}), tokenizer, objective, 4, rows=3)
    with pytest.raises(DataError, match="seed=5 but the data now gives seed=6"):
        other.restore(states[3])


def test_two_processes_take_disjoint_slices_covering_the_epoch(write_jsonl, tokenizer):
    cfg = _cfg(write_jsonl(_pair_rows(37, seed=3)), seq_len=512)
    by_tokens = {
        tuple(p.chosen.ids.tolist()): p.gid
        for p in Encoder(cfg, tokenizer).encode(_rows(cfg), DataStats())
    }
    slices = []
    for p in range(2):
        it = _iterator(cfg, tokenizer, batch_pairs=8, process_index=p, process_count=2)
        batches = take(it)
        assert all(b["valid"].shape == (4,) and b["tokens"].shape[0] == it.n_rows for b in batches)
        # global example ids: process p holds pairs 4p..4p+3, chosen i and rejected 8 + i
        slices.append([by_tokens[c[0]] for b in batches for c, _ in _pairs(b, 8, offset=4 * p)])
    a, b = set(slices[0]), set(slices[1])
    assert not a & b and sorted(slices[0] + slices[1]) == list(range(37))
    assert abs(len(a) - len(b)) <= 1


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_pairs_are_counted(write_jsonl, tokenizer, overlong):
    rows = _pair_rows(24, seed=4, most=60)
    cfg = _cfg(write_jsonl(rows), seq_len=96, overlong=overlong)
    whole = Encoder(_cfg(cfg.train[0], seq_len=4096), tokenizer).encode(_rows(cfg), DataStats())
    long = {p.gid for p in whole if max(len(p.chosen.ids), len(p.rejected.ids)) > 96}
    it = _iterator(cfg, tokenizer, batch_pairs=4)
    seen = [pair for b in take(it) for pair in _pairs(b, 4)]
    assert 0 < len(long) < 24 and it.stats.rows == 24
    if overlong == "drop":
        assert it.stats.dropped == {"overlong": len(long)} and len(seen) == 24 - len(long)
        return
    assert it.stats.truncated == len(long) and not it.stats.dropped and len(seen) == 24
    assert max(len(tokens) for pair in seen for tokens, _ in pair) == 96
    # a cut pair keeps the same prompt tail on both sides and each completion's head
    cut = Encoder(cfg, tokenizer).encode(_rows(cfg), DataStats())
    for full, short in zip(whole, cut):
        if full.gid not in long:
            continue
        p = short.chosen.prompt_len
        assert short.chosen.ids[:p].tolist() == short.rejected.ids[:p].tolist()
        for a, b in ((full.chosen, short.chosen), (full.rejected, short.rejected)):
            assert b.ids[:p].tolist() == a.ids[a.prompt_len - p : a.prompt_len].tolist()
            assert (
                b.ids[p:].tolist() == a.ids[a.prompt_len : a.prompt_len + len(b.ids) - p].tolist()
            )
            assert len(b.ids) <= 96 and b.trained > 0


def test_fit_completions_keeps_prompt_tail_bos_and_completion_head():
    prompt, completion = list(range(100, 120)), list(range(200, 212))
    ex = Example(0, np.array([1, *prompt, *completion]), np.array([0] * 21 + [1] * 12, bool))
    (short,) = fit_completions([ex], 16, bos_id=1)  # prompt budget max(16 - 12, 8) = 8
    assert short.ids.tolist() == [1, *prompt[-7:], *completion[:8]]
    assert short.mask.tolist() == [False] * 8 + [True] * 8
    (short,) = fit_completions([ex], 28, bos_id=None)  # the completion fits whole
    assert short.ids.tolist() == [*prompt[-16:], *completion]


def test_wrong_rows_and_settings_are_clear_errors(write_jsonl, tokenizer):
    pairs = _cfg(write_jsonl(_pair_rows(4), name="pairs.jsonl"))
    with pytest.raises(DataError, match="the rows are preference rows; objective 'kto'"):
        build_preference_iterators(pairs, tokenizer, objective="kto", batch_pairs=4)
    with pytest.raises(DataError, match="not a positive multiple of the 2 processes"):
        build_preference_iterators(
            pairs, tokenizer, objective="pairs", batch_pairs=3, process_count=2
        )
    kto = _cfg(write_jsonl(_kto_rows(4), name="kto.jsonl"))
    with pytest.raises(DataError, match="KTO needs at least 2 examples per process"):
        build_preference_iterators(kto, tokenizer, objective="kto", batch_pairs=1)


def test_validation_is_one_pass_in_order_with_the_train_shape(write_jsonl, tokenizer):
    cfg = _cfg(write_jsonl(_pair_rows(60, seed=6)), seq_len=512, validation_fraction=0.2)
    train, val = build_preference_iterators(cfg, tokenizer, objective="pairs", batch_pairs=4)
    assert val is not None and val.n_rows == train.n_rows < 8
    first = take(val)
    assert sum(int(b["valid"].sum()) for b in first) == 12
    val.reset()
    assert_same_batches(take(val), first)


def test_kl_lengths_used_for_packing_match_the_kl_examples():
    from jaxft.data.encode import KtoExample
    from jaxft.data.preference import unit_examples, unit_lengths

    def kto(gid, prompt, completion):
        ids = np.arange(prompt + completion) + 10
        return KtoExample(gid, Example(gid, ids, np.arange(len(ids)) >= prompt), True)

    units = [kto(0, 5, 30), kto(1, 28, 4), kto(2, 12, 12)]  # KL 0: 5 + 12, KL 1: 28 + 30 > 32
    examples = unit_examples(units, 32, bos_id=None)
    assert unit_lengths(units, 32) == [len(ex.ids) for ex in examples] == [35, 32, 24, 17, 32, 16]
    assert all(ex.trained > 0 for ex in examples[3:])
