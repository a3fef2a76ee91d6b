"""The JSON-validity metric on crafted outputs."""

from __future__ import annotations

from jaxft.eval.json_metric import score_json, summarize

SCHEMA = {"type": "object", "required": ["order_id", "status"],
          "properties": {"order_id": {"type": "string"},
                         "status": {"enum": ["shipped", "pending"]}},
          "additionalProperties": False}


def test_valid_json():
    v = score_json('  {"order_id": "A1", "status": "shipped"}\n', SCHEMA)
    assert v.valid_json and v.schema_valid and not v.filler and v.contains_json


def test_invalid_json():
    v = score_json('{"order_id": "A1", "status": }', SCHEMA)
    assert not v.valid_json and v.schema_valid is False and not v.contains_json
    assert "not JSON" in v.error


def test_filler_around_json():
    v = score_json('Sure! Here is the order:\n{"order_id": "A1", "status": "pending"}\nAnything '
                   'else?', SCHEMA)
    assert not v.valid_json and v.contains_json and v.filler and v.schema_valid is False


def test_schema_violations():
    wrong_enum = score_json('{"order_id": "A1", "status": "lost"}', SCHEMA)
    assert wrong_enum.valid_json and wrong_enum.schema_valid is False
    assert "lost" in wrong_enum.error
    extra = score_json('{"order_id": "A1", "status": "shipped", "note": 1}', SCHEMA)
    assert extra.valid_json and extra.schema_valid is False
    missing = score_json('{"order_id": "A1"}', SCHEMA)
    assert missing.schema_valid is False


def test_no_schema_and_arrays():
    v = score_json("[1, 2, 3]")
    assert v.valid_json and v.schema_valid is None
    assert score_json("the answer is [1, 2] ok").filler


def test_summary_fractions():
    outs = ['{"order_id": "A", "status": "shipped"}', "no json here",
            'Here: {"order_id": "B", "status": "pending"}', '{"order_id": 3, "status": "x"}']
    s = summarize(score_json(o, SCHEMA) for o in outs)
    assert s == {"n": 4, "json_valid": 0.5, "contains_json": 0.75, "filler": 0.25,
                 "schema_valid": 0.25}
