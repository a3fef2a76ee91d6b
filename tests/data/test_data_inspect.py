"""``jaxft data inspect``: the report's figures, preference and KTO balance, the CLI."""

from __future__ import annotations

import json

import numpy as np
from data_helpers import chat

from jaxft.data import DataConfig, build_iterators
from jaxft.data.inspect import format_report, inspect_data
from jaxft.data.synthetic import synthetic_chats


def test_sft_report_matches_what_the_iterator_produces(write_jsonl, tokenizer, tmp_path):
    path = write_jsonl(list(synthetic_chats(400, seed=5)))
    cfg = DataConfig(train=path, seq_len=1024, batch_size=4, pack_window=400, shuffle=False)
    report = inspect_data(cfg, tokenizer, str(tmp_path / "out"), n_examples=2)
    it, _ = build_iterators(cfg, tokenizer)
    batches = list(it)
    s = report.stats
    assert s["rows"] == s["examples"] + sum(s["dropped"].values()) == 400
    assert s["tokens"] == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert s["trained_tokens"] == sum(int(b["loss_mask"].sum()) for b in batches)
    assert 0 < report.trained_fraction < 1
    assert report.packing_efficiency >= 0.95
    assert report.padded_efficiency < 0.5
    print(
        f"synthetic chats, seq_len 1024: packed {report.packing_efficiency:.1%}, "
        f"padded {report.padded_efficiency:.1%}"
    )
    assert report.lengths["max"] <= 1024 and report.lengths["n"] == s["examples"]
    with open(report.histogram, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # examples: the trained pieces are exactly the assistant turns and their <|im_end|>
    ex = report.examples[0]
    trained = [t for t, on in ex["pieces"] if on]
    assert trained and all(t.endswith("<|im_end|>") for t in trained)
    assistant = [
        m["content"] + "<|im_end|>"
        for m in next(synthetic_chats(1, seed=5))["messages"]
        if m["role"] == "assistant"
    ]
    assert trained == assistant
    text = format_report(report)
    assert "packing efficiency" in text and f"[[{trained[0]}]]" in text
    assert "\x1b[1;32m" in format_report(report, color=True)
    json.dumps(report.to_dict())


def _pref(i, chosen_words, rejected_words):
    return {
        "prompt": f"Question {i}?",
        "chosen": "kato " * chosen_words,
        "rejected": "rimu " * rejected_words,
    }


def test_length_biased_preference_data_is_flagged(write_jsonl, tokenizer):
    rng = np.random.default_rng(0)
    biased = [_pref(i, int(rng.integers(3, 10)), int(rng.integers(12, 30))) for i in range(50)]
    report = inspect_data(DataConfig(train=write_jsonl(biased, "b.jsonl")), tokenizer)
    p = report.preference
    assert report.family == "preference" and p["pairs"] == 50
    assert p["chosen_shorter"] == 1.0 and p["ratio"] < 0.5
    assert any("length-biased" in w and "learn to be shorter" in w for w in report.warnings)

    balanced = [
        _pref(i, n, m) for i, (n, m) in enumerate(rng.integers(5, 20, size=(200, 2)).tolist())
    ]
    report = inspect_data(DataConfig(train=write_jsonl(balanced, "ok.jsonl")), tokenizer)
    assert 0.8 < report.preference["ratio"] < 1.25
    assert not [w for w in report.warnings if "length-biased" in w]
    assert {"chosen", "rejected"} <= set(report.examples[0])


def test_kto_balance_is_reported(write_jsonl, tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i < 9} for i in range(10)]
    report = inspect_data(DataConfig(train=write_jsonl(rows)), tokenizer)
    assert report.kto == {"desirable": 9, "undesirable": 1, "ratio": 9.0}
    assert any("undesirable_weight=9.00" in w for w in report.warnings)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(10)]
    report = inspect_data(DataConfig(train=write_jsonl(rows, "even.jsonl")), tokenizer)
    assert report.kto["ratio"] == 1.0 and not report.warnings


def test_cli_data_inspect(write_jsonl, tokenizer_dir, tmp_path, capsys):
    from jaxft.cli.main import main

    path = write_jsonl([chat(i, turns=2) for i in range(30)])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  tokenizer: {tokenizer_dir}\ndata:\n  train: {path}\n  seq_len: 512\n"
    )
    out = tmp_path / "inspect"
    assert (
        main(
            [
                "data",
                "inspect",
                str(config),
                "data.seq_len=256",
                "--out",
                str(out),
                "--color",
                "never",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rows 30  examples 30" in printed and "(seq_len 256)" in printed
    report = json.loads((out / "report_train.json").read_text())
    assert report["stats"]["rows"] == 30 and report["seq_len"] == 256
    assert (out / "lengths_train.png").exists()

    with open(path, "a") as f:
        f.write('{"messages": [{"role": "narrator", "content": "x"}]}\n')
    assert main(["data", "inspect", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:31: field 'messages[0].role': unknown role 'narrator'" in err
    assert main(["data", "inspect", str(config), "data.on_error=skip", "--out", str(out)]) == 0
    assert "skipped {'unknown_role': 1}" in capsys.readouterr().out
