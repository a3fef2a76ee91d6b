"""Row formats: recognise a row's format, validate it and turn it into a typed value.

Formats (the field names follow TRL's dataset formats):

- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
- ``prompt_completion``: ``{"prompt": P, "completion": C}``;
- ``text``: ``{"text": str}`` (language modelling: every token is trained);
- ``preference``: ``{"prompt": P, "chosen": C, "rejected": C}``;
- ``kto``: ``{"prompt": P, "completion": C, "label": bool}``.

``P`` and ``C`` are a string or a list of messages. A string prompt becomes one user message and a
string completion one assistant message, so every format but ``text`` goes through the chat
template. Only the completion's assistant turns are trained (prompt turns are context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "prompt_completion", "text", "preference", "kto")
# Rows of one family can share a loader; preference and KTO rows need their own trainers.
FAMILY = {
    "messages": "sft",
    "prompt_completion": "sft",
    "text": "sft",
    "preference": "preference",
    "kto": "kto",
}
_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}

Message = dict[str, str]


class RowError(Exception):
    """A row problem, before the reader adds where the row is (file, line)."""

    def __init__(self, field: str | None, problem: str, kind: str) -> None:
        super().__init__(f"field '{field}': {problem}" if field else problem)
        self.field, self.problem, self.kind = field, problem, kind


@dataclass(frozen=True, slots=True)
class Chat:
    """A conversation; assistant turns at index >= ``train_from`` carry loss."""

    messages: list[Message]
    train_from: int = 0


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Pair:
    """A preference pair: the prompt conversation and two completions."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass(frozen=True, slots=True)
class Kto:
    prompt: list[Message]
    completion: list[Message]
    label: bool


Parsed = Chat | Text | Pair | Kto


def detect_format(row: Any) -> str | None:
    """The format whose fields the row has (the most specific match), or None."""
    if not isinstance(row, dict):
        return None
    for fmt in ("preference", "kto", "messages", "prompt_completion", "text"):
        if all(k in row for k in _FIELDS[fmt]):
            return fmt
    return None


def format_hint(fmt: str) -> str:
    return f"format '{fmt}' needs the fields {', '.join(_FIELDS[fmt])}"


def parse_row(row: Any, fmt: str) -> Parsed:
    """Validate ``row`` as format ``fmt``; raise ``RowError`` naming the bad field."""
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object, got {type(row).__name__}", "not_an_object")
    for name in _FIELDS[fmt]:
        if row.get(name) is None:
            raise RowError(
                name,
                f"missing ({format_hint(fmt)}; the row has {sorted(row) or 'no fields'})",
                "missing_field",
            )
    if fmt == "messages":
        messages = _messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError(
                "messages", "no assistant message, so nothing would be trained", "no_assistant"
            )
        return Chat(messages)
    if fmt == "text":
        return Text(_text(row["text"], "text"))
    prompt = _turns(row["prompt"], "prompt", "user")
    if fmt == "prompt_completion":
        completion = _completion(row["completion"], "completion")
        return Chat(prompt + completion, train_from=len(prompt))
    if fmt == "preference":
        return Pair(
            prompt, _completion(row["chosen"], "chosen"), _completion(row["rejected"], "rejected")
        )
    label = row["label"]
    if not isinstance(label, bool):
        raise RowError("label", f"expected true or false, got {label!r}", "bad_label")
    return Kto(prompt, _completion(row["completion"], "completion"), label)


def _text(value: Any, field: str) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # Content parts ({"type": "text", "text": ...}) as in multimodal chat formats.
        if any(p.get("type", "text") != "text" for p in value):
            raise RowError(field, "only text content parts are supported", "bad_content")
        value = "".join(str(p.get("text", "")) for p in value)
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}", "bad_type")
    if not value.strip():
        raise RowError(field, "is empty", "empty_content")
    return value


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError(
            field, "expected a non-empty list of {role, content} messages", "bad_messages"
        )
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(
                where, f"expected a message object, got {type(m).__name__}", "bad_messages"
            )
        role = m.get("role")
        if role is None:
            raise RowError(f"{where}.role", "missing", "missing_field")
        if role not in ROLES:
            raise RowError(
                f"{where}.role",
                f"unknown role {role!r} (use one of {', '.join(ROLES)})",
                "unknown_role",
            )
        if m.get("content") is None:
            raise RowError(f"{where}.content", "missing", "missing_field")
        out.append({"role": role, "content": _text(m["content"], f"{where}.content")})
    return out


def _turns(value: Any, field: str, role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": _text(value, field)}]
    return _messages(value, field)


def _completion(value: Any, field: str) -> list[Message]:
    turns = _turns(value, field, "assistant")
    if not any(m["role"] == "assistant" for m in turns):
        raise RowError(
            field, "has no assistant message, so nothing would be trained", "no_assistant"
        )
    return turns
