"""Bad input: one clear error naming file, line and field; with on_error=skip, counted, not lost."""

from __future__ import annotations

import json

import pytest
from data_helpers import chat, segments

from jaxft.data import DataConfig, build_iterators
from jaxft.data.inspect import inspect_data
from jaxft.errors import DataError

N = 12
BAD_LINE = 5  # 1-based line of the bad row in rows.jsonl

CASES = {
    "malformed_json": (
        '{"messages": [{"role": "user", "content": "hi"}',
        r"rows.jsonl:5: malformed JSON at column \d+",
    ),
    "missing_field": (
        {"mesages": chat(0)["messages"]},
        r"rows.jsonl:5: field 'messages': missing \(format 'messages' needs the fields "
        r"messages; the row has \['mesages'\]\)",
    ),
    "unknown_role": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        r"rows.jsonl:5: field 'messages\[1\].role': unknown role 'bot' "
        r"\(use one of system, user, assistant\)",
    ),
    "empty_content": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        r"rows.jsonl:5: field 'messages\[1\].content': is empty",
    ),
    "invalid_utf8": (
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
        r"rows.jsonl:5: invalid UTF-8 at byte offset 46 of the line",
    ),
    "no_assistant": (
        {"messages": [{"role": "user", "content": "q"}]},
        r"rows.jsonl:5: field 'messages': no assistant message",
    ),
}


def _write(tmp_path, bad):
    lines = [json.dumps(chat(i)).encode() for i in range(N)]
    lines[BAD_LINE - 1] = (
        bad
        if isinstance(bad, bytes)
        else (bad.encode() if isinstance(bad, str) else json.dumps(bad).encode())
    )
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _cfg(path, **kw):
    return DataConfig(train=path, seq_len=256, batch_size=2, shuffle=False, prefetch=0, **kw)


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_row_raises_one_clear_error(kind, tmp_path, tokenizer):
    bad, message = CASES[kind]
    path = _write(tmp_path, bad)
    it, _ = build_iterators(_cfg(path), tokenizer)
    with pytest.raises(DataError, match=message) as e:
        list(it)
    assert "data.on_error=skip" in str(e.value)
    assert str(tmp_path) in str(e.value)  # the full path of the file


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_row_is_skipped_and_counted(kind, tmp_path, tokenizer):
    bad, _ = CASES[kind]
    path = _write(tmp_path, bad)
    it, _ = build_iterators(_cfg(path, on_error="skip"), tokenizer)
    batches = list(it)
    assert it.stats.skipped == {kind: 1}
    assert it.stats.rows == N and it.stats.examples == N - 1
    # every good row went through, the bad one alone is missing
    good = {tuple(s) for b in batches for s in segments(b)}
    assert len(good) == N - 1 == sum(len(segments(b)) for b in batches)
    report = inspect_data(_cfg(path, on_error="skip"), tokenizer)
    assert report.stats["skipped"] == {kind: 1}
    assert any("1 bad rows skipped" in w for w in report.warnings)
    assert f"rows.jsonl:{BAD_LINE}" in report.stats["skip_samples"][kind]


def test_missing_file_is_an_error(tmp_path, tokenizer):
    cfg = _cfg(str(tmp_path / "nope" / "*.jsonl"))
    with pytest.raises(DataError, match=r"data.train: no file matches '.*nope/\*.jsonl'"):
        build_iterators(cfg, tokenizer)
    with pytest.raises(DataError, match="data.validation: no file matches"):
        build_iterators(
            _cfg(_write(tmp_path, chat(0)), validation=str(tmp_path / "v.jsonl")), tokenizer
        )


def test_malformed_json_array_file_names_line_and_column(tmp_path, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('[\n {"text": "a b c"},\n {"text": "d" oops}\n]\n')
    with pytest.raises(DataError, match=r"rows.json:3: malformed JSON at column 15"):
        build_iterators(_cfg(str(path)), tokenizer)


def test_unknown_format_names_the_fields_found(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"cannot tell the row format.*\['answer', 'question'\]"):
        build_iterators(_cfg(str(path)), tokenizer)
