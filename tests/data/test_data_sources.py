"""Sources: JSON lines, JSON arrays, parquet, CSV, save_to_disk, globs, TFDS; format detection."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from data_helpers import chat

from jaxft.data import DataConfig, iter_examples
from jaxft.data.rows import Chat, Kto, Pair, Text
from jaxft.data.sources import RowTable, open_sources
from jaxft.errors import DataError

ROWS = [chat(i) for i in range(6)]


def _values(patterns, fmt="auto"):
    table = RowTable(open_sources(patterns), fmt)
    return [r.value for r in table.read(range(len(table)))], table


def _want():
    return [Chat(r["messages"]) for r in ROWS]


def test_jsonl_with_blank_lines_and_crlf_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    path.write_bytes(("\r\n".join(lines[:3]) + "\r\n\r\n   \n" + "\n".join(lines[3:])).encode())
    values, table = _values([str(path)])
    assert values == _want()
    assert [r.ref.line for r in table.read(range(6))] == [1, 2, 3, 6, 7, 8]
    assert str(table.read([4])[0].ref) == f"{path}:7"


def test_json_array_parquet_csv_and_save_to_disk(tmp_path):
    import datasets

    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    assert _values([str(tmp_path / "a.json")])[0] == _want()

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    assert _values([str(tmp_path / "a.parquet")])[0] == _want()

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert _values([str(tmp_path / "saved")])[0] == _want()
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:4]),
            "test": datasets.Dataset.from_list(ROWS[4:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _values([str(tmp_path / "dd")])[0] == _want()[:4]  # "train" by default
    assert _values([f"{tmp_path / 'dd'}#test"])[0] == _want()[4:]
    with pytest.raises(DataError, match=r"no split 'dev' \(the dataset has \['test', 'train'\]\)"):
        open_sources([f"{tmp_path / 'dd'}#dev"])

    (tmp_path / "pc.csv").write_text('prompt,completion\n"Hi, you",Hello\n"Two\nlines",Ok\n')
    values, table = _values([str(tmp_path / "pc.csv")])
    assert table.formats == ["prompt_completion"]
    assert values[1] == Chat(
        [{"role": "user", "content": "Two\nlines"}, {"role": "assistant", "content": "Ok"}],
        train_from=1,
    )
    assert str(table.read([1])[0].ref).endswith("pc.csv, row index 1")


def test_globs_and_directories_read_files_in_sorted_order(tmp_path):
    for k in (2, 0, 1):
        (tmp_path / f"part-{k}.jsonl").write_text(json.dumps(ROWS[k]) + "\n")
    assert _values([str(tmp_path / "part-*.jsonl")])[0] == _want()[:3]
    assert _values([str(tmp_path)])[0] == _want()[:3]


def test_formats_are_detected_per_source(tmp_path):
    rows = {
        "text.jsonl": {"text": "plain words"},
        "pc.jsonl": {"prompt": "p", "completion": "c"},
        "pref.jsonl": {"prompt": "p", "chosen": "good", "rejected": "bad"},
        "kto.jsonl": {
            "prompt": [{"role": "user", "content": "p"}],
            "completion": "c",
            "label": True,
        },
    }
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
    (text,), _ = _values([str(tmp_path / "text.jsonl")])
    assert text == Text("plain words")
    (pref,), table = _values([str(tmp_path / "pref.jsonl")])
    assert table.family == "preference"
    assert pref == Pair(
        [{"role": "user", "content": "p"}],
        [{"role": "assistant", "content": "good"}],
        [{"role": "assistant", "content": "bad"}],
    )
    (kto,), _ = _values([str(tmp_path / "kto.jsonl")])
    assert kto == Kto(
        [{"role": "user", "content": "p"}], [{"role": "assistant", "content": "c"}], True
    )
    # SFT formats mix; preference and SFT rows do not
    _values([str(tmp_path / "text.jsonl"), str(tmp_path / "pc.jsonl")])
    with pytest.raises(DataError, match="sources mix row families"):
        _values([str(tmp_path / "pc.jsonl"), str(tmp_path / "pref.jsonl")])
    # an explicit format is enforced: the field it needs is named
    values, _ = _values([str(tmp_path / "pc.jsonl")], fmt="messages")
    assert "field 'messages': missing" in str(values[0])


def test_text_rows_end_with_a_trained_eos(tmp_path, tokenizer):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "Kato rimu senlo."}) + "\n")
    (ex,) = iter_examples(DataConfig(train=str(tmp_path / "t.jsonl")), tokenizer)
    assert ex.ids[-1] == tokenizer.eos_token_id and ex.mask.all()
    assert tokenizer.decode(ex.ids.tolist()) == "Kato rimu senlo.<|im_end|>"


def test_tfds_source_through_data_source(monkeypatch, tmp_path):
    """tfds.data_source is stood in for (tensorflow-datasets is an optional extra): the adapter
    turns its bytes and arrays into rows and reads only the indices asked for."""
    asked = []

    class Source:
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            asked.append(i)
            return self.rows[i]

    def data_source(name, split, data_dir):
        if name != "my_chats":
            raise FileNotFoundError(f"{name} not prepared in {data_dir}")
        rows = [
            {
                "prompt": f"q{i}".encode(),
                "completion": np.array(f"a{i}".encode()),
                "label": np.bool_(i % 2),
            }
            for i in range(4)
        ]
        return Source(rows if split == "train" else rows[:1])

    monkeypatch.setitem(
        sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source)
    )
    table = RowTable(open_sources(["tfds:my_chats"]), "auto")
    assert len(table) == 4 and table.family == "kto"
    asked.clear()
    (row,) = table.read([2])
    assert asked == [2]
    assert row.value == Kto(
        [{"role": "user", "content": "q2"}], [{"role": "assistant", "content": "a2"}], False
    )
    assert len(RowTable(open_sources(["tfds:my_chats#validation"]))) == 1
    with pytest.raises(DataError, match="tfds:other: cannot open the TFDS dataset"):
        open_sources(["tfds:other"])


def test_preference_and_kto_examples_for_their_batchers(tmp_path, tokenizer):
    from jaxft.data import KtoExample, PairExample, build_iterators

    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Which?", "chosen": "Good.", "rejected": "Bad!"}) + "\n")
    (pair,) = iter_examples(DataConfig(train=str(pref)), tokenizer)
    assert isinstance(pair, PairExample) and pair.gid == 0
    n = pair.chosen.prompt_len
    assert n == pair.rejected.prompt_len and (pair.chosen.ids[:n] == pair.rejected.ids[:n]).all()
    for ex, text in ((pair.chosen, "Good."), (pair.rejected, "Bad!")):
        assert tokenizer.decode(ex.ids[ex.mask].tolist()) == text + "<|im_end|>"
    with pytest.raises(DataError, match="the rows are preference rows"):
        build_iterators(DataConfig(train=str(pref)), tokenizer)

    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "Q", "completion": "A.", "label": False}) + "\n")
    (k,) = iter_examples(DataConfig(train=str(kto)), tokenizer)
    assert isinstance(k, KtoExample) and k.label is False
    assert tokenizer.decode(k.example.ids[k.example.mask].tolist()) == "A.<|im_end|>"


def test_importing_jaxft_data_is_light():
    """No jax, no training code, no transformers at import time (they load when first used)."""
    import subprocess

    code = (
        "import sys, jaxft.data, jaxft.data.inspect, jaxft.cli.data_cmd; "
        "heavy = [m for m in ('jax', 'transformers', 'jaxft.train', 'matplotlib', 'datasets') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
