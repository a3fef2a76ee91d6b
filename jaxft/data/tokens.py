"""Tokenization with loss masks, the pad token, and loading a tokenizer from a local directory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Bool, Int

from jaxft.data.chat import Rendered, render_chat
from jaxft.data.rows import Message
from jaxft.errors import DataError

# Tokens a model must learn to emit at the end of a turn or document: never used as padding.
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")


def backend(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` behind a transformers fast tokenizer."""
    tok = getattr(tokenizer, "backend_tokenizer", None)
    if tok is None:
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: jaxft needs a "
            "tokenizer.json (a transformers fast tokenizer)"
        )
    return tok


def tokenize_rendered(
    tokenizer: Any, rendered: Sequence[Rendered]
) -> list[tuple[Int[np.ndarray, " L"], Bool[np.ndarray, " L"]]]:
    """Tokenize rendered texts in one batch; mark the tokens that overlap a trained span.

    A token is trained when its character range overlaps a span, the rule transformers applies to
    ``{% generation %}`` blocks (``apply_chat_template(..., return_assistant_tokens_mask=True)``).
    No special tokens are added: templates render their own BOS, as in ``apply_chat_template``.
    """
    encodings = backend(tokenizer).encode_batch(
        [r.text for r in rendered], add_special_tokens=False
    )
    out = []
    for enc, r in zip(encodings, rendered):
        ids = np.asarray(enc.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        for a, b in r.spans:
            first, last = _token_range(enc, a, b, len(ids))
            mask[first:last] = True
        out.append((ids, mask))
    return out


def _token_range(enc: Any, a: int, b: int, n: int) -> tuple[int, int]:
    """``[first, last)``: the tokens overlapping characters ``[a, b)``.

    Asks the encoding only about the span's ends (a few calls per turn, not per token); characters
    no token covers (whitespace some pre-tokenizers drop) are stepped over. ``char_to_token``
    gives the first token holding a character, so only the end needs extending, over the further
    byte-level tokens of a character split into several.
    """
    first = next((t for c in range(a, b) if (t := enc.char_to_token(c)) is not None), None)
    if first is None:
        return 0, 0
    last = next(t for c in range(b - 1, a - 1, -1) if (t := enc.char_to_token(c)) is not None)
    last += 1
    while last < n and enc.token_to_chars(last)[0] < b:
        last += 1
    return first, last


def assistant_mask(
    messages: Sequence[Message],
    tokenizer: Any,
    *,
    template: str = "chatml",
    train_from: int = 0,
    method: str = "auto",
) -> tuple[Int[np.ndarray, " L"], Bool[np.ndarray, " L"]]:
    """Token ids of a rendered conversation and its loss mask.

    The mask is True on every assistant turn's tokens (index >= ``train_from``) and its
    end-of-turn token, False elsewhere; with generation markers it equals transformers'
    ``assistant_masks``; without them it is found from rendered prefixes (``jaxft.data.chat``).
    """
    return tokenize_rendered(
        tokenizer,
        [render_chat(messages, tokenizer, template=template, train_from=train_from, method=method)],
    )[0]


def resolve_pad_id(tokenizer: Any, pad_token: str | None = None) -> int:
    """The padding id: never the EOS id nor an end-of-turn token the model must learn to emit.

    In order: ``pad_token`` if given; the tokenizer's pad token; an added token named like a pad
    token (``<|finetune_right_pad_id|>``, ``<|fim_pad|>``, ...); the unknown token. No token is
    added to the vocabulary (that would change the embedding's shape). Padding carries no loss
    and is masked from attention by ``segment_ids == 0``; the rule only keeps EOS out of it.
    """
    vocab = tokenizer.get_vocab()
    banned = {tokenizer.eos_token_id} | {vocab[t] for t in _END_TOKENS if t in vocab}
    if pad_token is not None:
        if pad_token not in vocab:
            raise DataError(f"data.pad_token={pad_token!r} is not in the tokenizer's vocabulary")
        if vocab[pad_token] in banned:
            raise DataError(
                f"data.pad_token={pad_token!r} is an end-of-sequence token; pick a "
                "token the model never has to emit"
            )
        return vocab[pad_token]
    candidates = [tokenizer.pad_token_id]
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    candidates += sorted(vocab[t] for t in added if "pad" in t.lower() and t in vocab)
    candidates.append(tokenizer.unk_token_id)
    for c in candidates:
        if c is not None and c not in banned:
            return int(c)
    raise DataError(
        "the tokenizer has no pad token distinct from its EOS token; set "
        "data.pad_token to a token of the vocabulary the model never has to emit"
    )


def load_tokenizer(path: str) -> Any:
    """A transformers fast tokenizer from a local directory (no network)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot load a tokenizer from {path!r} ({e}); point model.tokenizer at "
            "a directory with tokenizer.json"
        ) from None
    backend(tokenizer)
    return tokenizer
