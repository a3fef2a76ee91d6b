"""Chat rendering: a conversation becomes text plus the character spans that carry loss.

The loss covers each trained assistant turn's content and its end-of-turn token, nothing else.
Three ways to find those spans:

- built-in ChatML: the spans are known while rendering;
- a tokenizer's Jinja template with ``{% generation %}`` markers: the marked blocks, as transformers
  reports them for ``apply_chat_template(..., return_assistant_tokens_mask=True)``;
- a template without markers (most stock templates): render conversation prefixes. For assistant
  turn ``i``, the turn starts where ``messages[:i]`` rendered with the generation prompt ends and
  ends where ``messages[:i+1]`` ends, without trailing whitespace (the newline after an
  end-of-turn token is not part of the turn). Both prefixes must be prefixes of the whole
  rendering; a template that rewrites earlier turns (for example by dropping their reasoning) is
  refused rather than given a wrong mask.

Only strings are rendered here; tokenization happens once per conversation, on the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxft.data.rows import Message, RowError
from jaxft.errors import DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True, slots=True)
class Rendered:
    """Rendered text and the ``[start, end)`` character spans that carry loss (sorted, disjoint)."""

    text: str
    spans: tuple[tuple[int, int], ...]


def render_chatml(
    messages: Sequence[Message], train_from: int = 0, add_generation_prompt: bool = False
) -> Rendered:
    """Render ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    The trained span of an assistant turn is its content and ``<|im_end|>``; the newline after it
    is not trained. This matches Qwen2.5's template with ``{% generation %}`` around content and
    ``<|im_end|>`` (as TRL's training templates place it). No BOS token is rendered.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, m in enumerate(messages):
        head = f"{IM_START}{m['role']}\n"
        body = f"{m['content']}{IM_END}"
        if m["role"] == "assistant" and i >= train_from:
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts += (head, body, "\n")
        pos += len(head) + len(body) + 1
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return Rendered("".join(parts), tuple(spans))


class TemplateRenderer:
    """Renders with a tokenizer's own Jinja chat template (as ``apply_chat_template`` does).

    ``method``: "markers" uses ``{% generation %}`` blocks, "prefix" renders conversation prefixes,
    "auto" picks markers when the template has them.
    """

    def __init__(self, tokenizer: Any, method: str = "auto") -> None:
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise DataError(
                "data.template=tokenizer needs a transformers release with "
                "transformers.utils.chat_template_utils.render_jinja_template; upgrade "
                "transformers or use data.template=chatml"
            ) from None
        self._render_jinja = render_jinja_template
        try:
            template = tokenizer.get_chat_template()
        except ValueError:
            template = None
        if not template:
            raise DataError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                "chat_template; set data.template=chatml or use a tokenizer with one"
            )
        has_markers = bool(_GENERATION_TAG.search(template))
        if method == "markers" and not has_markers:
            raise DataError(
                "data.mask_method=markers but the chat template has no "
                "{% generation %} markers; use mask_method=prefix or auto"
            )
        self.template = template
        self.method = ("markers" if has_markers else "prefix") if method == "auto" else method
        # The template sees the special tokens by name, as in apply_chat_template.
        self._kwargs = dict(tokenizer.special_tokens_map)

    def __call__(self, messages: Sequence[Message], train_from: int = 0) -> Rendered:
        if self.method == "markers":
            return self._markers(messages, train_from)
        return self._prefixes(messages, train_from)

    def render(
        self, conversations: list[list[Message]], add_generation_prompt: bool, markers: bool = False
    ) -> tuple[list[str], list[list[tuple[int, int]]]]:
        try:
            return self._render_jinja(
                conversations,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=markers,
                **self._kwargs,
            )
        except Exception as e:  # jinja2 raises TemplateError and plain Python errors alike
            raise RowError(
                None, f"the chat template failed: {type(e).__name__}: {e}", "template_error"
            ) from None

    def _markers(self, messages: Sequence[Message], train_from: int) -> Rendered:
        (text,), (blocks,) = self.render([list(messages)], False, markers=True)
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        if len(blocks) != n_assistant:
            raise RowError(
                None,
                f"the template marks {len(blocks)} generation blocks for "
                f"{n_assistant} assistant messages; set data.mask_method=prefix",
                "template_error",
            )
        skip = sum(m["role"] == "assistant" for m in messages[:train_from])
        return Rendered(text, tuple((a, b) for a, b in blocks[skip:] if b > a))

    def _prefixes(self, messages: Sequence[Message], train_from: int) -> Rendered:
        messages = list(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
        heads, _ = self.render([messages[:i] for i in turns], True)
        ends, _ = self.render([messages[: i + 1] for i in turns] + [messages], False)
        full = ends.pop()
        spans = []
        for i, head, end in zip(turns, heads, ends):
            if not (full.startswith(head) and full.startswith(end)):
                raise RowError(
                    None,
                    f"the chat template renders the conversation up to message "
                    f"{i} differently from the whole conversation, so the assistant "
                    "tokens cannot be found by prefixes; add {% generation %} markers "
                    "to the template or set data.template=chatml",
                    "template_error",
                )
            start, stop = len(head), len(end.rstrip())
            if stop <= start:
                raise RowError(
                    f"messages[{i}]",
                    "the chat template renders nothing for this assistant message",
                    "template_error",
                )
            spans.append((start, stop))
        return Rendered(full, tuple(spans))


def render_chat(
    messages: Sequence[Message],
    tokenizer: Any = None,
    *,
    template: str = "chatml",
    train_from: int = 0,
    method: str = "auto",
) -> Rendered:
    """Render ``messages`` and find the character spans that carry loss.

    ``template="chatml"`` needs no tokenizer; ``template="tokenizer"`` uses ``tokenizer``'s Jinja
    template (see the module docstring for how spans are found without generation markers). Only
    assistant messages at index >= ``train_from`` are trained.
    """
    if template == "chatml":
        return render_chatml(messages, train_from)
    try:
        return TemplateRenderer(tokenizer, method)(messages, train_from)
    except RowError as e:
        raise DataError(str(e)) from None
