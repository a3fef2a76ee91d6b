"""Deterministic synthetic chat data and a tiny locally trained tokenizer (tests, benchmarks).

Nothing is downloaded: words are made of syllables from a seeded generator, the tokenizer is a
byte-level BPE trained on them with ``tokenizers``, with ChatML and Llama-3 special tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<pad>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
_SYLLABLES = (
    "ka",
    "to",
    "ri",
    "mu",
    "sen",
    "lo",
    "pa",
    "vi",
    "ne",
    "do",
    "qu",
    "zi",
    "ha",
    "bel",
    "tor",
    "ing",
    "ed",
    "s",
    "an",
    "or",
)


class Words:
    """A seeded vocabulary of made-up words and sentences drawn from it."""

    def __init__(self, seed: int = 0, n_words: int = 3000) -> None:
        self.rng = random.Random(seed)
        pick = self.rng.choice
        self.words = sorted(
            {
                "".join(pick(_SYLLABLES) for _ in range(self.rng.randint(1, 3)))
                for _ in range(n_words)
            }
        )

    def sentence(self, n_words: int) -> str:
        return (
            " ".join(self.rng.choice(self.words) for _ in range(max(1, n_words))).capitalize() + "."
        )

    def passage(self, n_words: int) -> str:
        out, left = [], max(1, n_words)
        while left > 0:
            k = min(left, self.rng.randint(4, 14))
            out.append(self.sentence(k))
            left -= k
        return " ".join(out)


def synthetic_chats(
    n: int, seed: int = 0, max_turns: int = 4, mean_words: float = 40.0
) -> Iterator[dict[str, Any]]:
    """``n`` rows ``{"messages": [...]}`` with a long-tailed (log-normal) reply length."""
    words = Words(seed)
    rng = words.rng
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": words.sentence(rng.randint(4, 12))})
        for _ in range(rng.randint(1, max_turns)):
            messages.append({"role": "user", "content": words.passage(rng.randint(3, 30))})
            length = int(rng.lognormvariate(0, 0.9) * mean_words)
            messages.append({"role": "assistant", "content": words.passage(length)})
        yield {"messages": messages}


def tiny_tokenizer(vocab_size: int = 1024, seed: int = 0) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML (the default chat template),
    Llama-3 header tokens, EOS ``<|im_end|>`` and pad ``<pad>``."""
    words = Words(seed)
    corpus = [words.passage(words.rng.randint(5, 40)) for _ in range(3000)]
    return train_bpe_tokenizer(corpus, vocab_size)


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE on ``corpus`` (with the ChatML/Llama-3 special tokens above)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<pad>")],
        chat_template=CHATML_TEMPLATE,
    )