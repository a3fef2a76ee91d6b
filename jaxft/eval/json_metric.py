"""JSON-validity scoring of generated answers.

For each output: does ``json.loads`` accept it (after trimming whitespace); does the value
validate against a JSON Schema when one is given (``jsonschema``); is there text outside the JSON
value (conversational filler such as "Sure! Here is the JSON: ..."), found by locating the first
JSON object or array in the text with ``json.JSONDecoder.raw_decode``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class JsonVerdict:
    valid_json: bool  # json.loads(output.strip()) succeeds
    schema_valid: bool | None  # None when no schema was given
    contains_json: bool  # a JSON object/array appears somewhere in the output
    filler: bool  # non-whitespace text outside the (first) JSON value
    error: str | None = None


def _embedded(text: str) -> tuple[Any, int, int] | None:
    """The first decodable JSON object/array in ``text``: ``(value, start, end)``."""
    for start, ch in enumerate(text):
        if ch in "{[":
            try:
                value, end = _DECODER.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            return value, start, end
    return None


def score_json(output: str, schema: Mapping[str, Any] | None = None) -> JsonVerdict:
    stripped = output.strip()
    error = None
    try:
        value, valid = json.loads(stripped), True
    except json.JSONDecodeError as e:
        value, valid, error = None, False, f"not JSON: {e.msg} at char {e.pos}"
    found = (value, 0, len(stripped)) if valid else _embedded(output)
    filler = False
    if found is not None and not valid:
        _, start, end = found
        filler = bool(output[:start].strip() or output[end:].strip())
    schema_valid = None
    if schema is not None:
        schema_valid = False
        if valid:
            import jsonschema

            try:
                jsonschema.validate(value, schema)
                schema_valid = True
            except jsonschema.ValidationError as e:
                error = f"schema: {e.message}"
    return JsonVerdict(valid, schema_valid, found is not None, filler, error)


def summarize(verdicts: Iterable[JsonVerdict]) -> dict[str, Any]:
    """Fractions over all samples: ``json_valid``, ``schema_valid``, ``filler``, ``contains_json``."""
    vs = list(verdicts)
    n = len(vs)
    if not n:
        return {"n": 0}
    with_schema = [v for v in vs if v.schema_valid is not None]
    out = {
        "n": n,
        "json_valid": sum(v.valid_json for v in vs) / n,
        "contains_json": sum(v.contains_json for v in vs) / n,
        "filler": sum(v.filler for v in vs) / n,
    }
    if with_schema:
        out["schema_valid"] = sum(bool(v.schema_valid) for v in with_schema) / len(with_schema)
    return out


def verdict_dict(v: JsonVerdict) -> dict[str, Any]:
    return asdict(v)
