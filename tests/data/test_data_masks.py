"""Chat rendering and assistant-only loss masks, token by token and against transformers."""

from __future__ import annotations

import pytest

from jaxft.data import DataConfig, Encoder, assistant_mask, render_chat, resolve_pad_id
from jaxft.data.rows import Chat, Kto, Pair
from jaxft.data.sources import Row, RowRef
from jaxft.data.synthetic import tiny_tokenizer
from jaxft.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello friend."},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Sure thing."},
]

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_MARKERS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_MARKERS = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def _tokenizer(template: str | None = None, bos: str | None = None):
    tok = tiny_tokenizer(vocab_size=1024)
    if template is not None:
        tok.chat_template = template
    if bos is not None:
        tok.bos_token = bos
    return tok


def _expected(tok, pieces):
    """Token ids and mask from (text, trained) pieces, each tokenized alone."""
    ids, mask = [], []
    for text, trained in pieces:
        piece = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def _check(tok, messages, pieces, **kw):
    ids, mask = assistant_mask(messages, tok, **kw)
    want_ids, want_mask = _expected(tok, pieces)
    assert ids.tolist() == want_ids  # the rendering, token by token
    got = [(tok.convert_ids_to_tokens(int(i)), int(m)) for i, m in zip(ids, mask)]
    want = [(tok.convert_ids_to_tokens(i), int(m)) for i, m in zip(want_ids, want_mask)]
    assert got == want  # the mask, token by token


def _chatml_turn(role, content, trained):
    return [
        ("<|im_start|>", 0),
        (f"{role}\n", 0),
        (content, trained),
        ("<|im_end|>", trained),
        ("\n", 0),
    ]


def _chatml_pieces(messages, default_system=None):
    pieces = []
    if default_system:
        pieces += _chatml_turn("system", default_system, 0)
    for m in messages:
        pieces += _chatml_turn(m["role"], m["content"], int(m["role"] == "assistant"))
    return pieces


def test_chatml_multi_turn_token_by_token(tokenizer):
    _check(tokenizer, CONVERSATION, _chatml_pieces(CONVERSATION))


def test_chatml_builtin_equals_tokenizer_chatml_template(tokenizer):
    # The tiny tokenizer's own template is ChatML: rendering by prefixes gives the same mask.
    a = assistant_mask(CONVERSATION, tokenizer)
    b = assistant_mask(CONVERSATION, tokenizer, template="tokenizer", method="prefix")
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    text = render_chat(CONVERSATION, tokenizer, template="tokenizer").text
    assert text == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_llama3_style_template_without_markers_token_by_token():
    tok = _tokenizer(LLAMA3, bos="<|begin_of_text|>")
    messages = [dict(m) for m in CONVERSATION]
    messages[4]["content"] = "  Sure thing. \n"  # the template trims content
    pieces = [("<|begin_of_text|>", 0)]
    for m in messages:
        trained = int(m["role"] == "assistant")
        pieces += [
            ("<|start_header_id|>", 0),
            (m["role"], 0),
            ("<|end_header_id|>", 0),
            ("\n\n", 0),
            (m["content"].strip(), trained),
            ("<|eot_id|>", trained),
        ]
    _check(tok, messages, pieces, template="tokenizer")
    assert render_chat(messages, tok, template="tokenizer").text == tok.apply_chat_template(
        messages, tokenize=False
    )


def test_qwen_style_template_without_markers_token_by_token():
    tok = _tokenizer(QWEN)
    no_system = CONVERSATION[1:]  # the template adds its default system prompt
    pieces = _chatml_pieces(no_system, default_system="You are Qwen, a helpful assistant.")
    _check(tok, no_system, pieces, template="tokenizer")
    _check(tok, CONVERSATION, _chatml_pieces(CONVERSATION), template="tokenizer")


ORACLE_CONVERSATIONS = [
    CONVERSATION,
    CONVERSATION[1:3],
    [
        {"role": "user", "content": "Ça va?"},
        {"role": "assistant", "content": "é très bien 🙂"},
        {"role": "user", "content": "Et  toi ?"},
        {"role": "assistant", "content": " Oui. "},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "trailing user turn"},
    ],
]


@pytest.mark.parametrize(
    "template,bos", [(CHATML_MARKERS, None), (LLAMA3_MARKERS, "<|begin_of_text|>")]
)
@pytest.mark.parametrize("method", ["markers", "prefix"])
def test_mask_equals_transformers_generation_mask(template, bos, method):
    """With {% generation %} markers, transformers' return_assistant_tokens_mask is the oracle,
    for jaxft's markers path and for its prefix path (which ignores the markers)."""
    tok = _tokenizer(template, bos)
    for messages in ORACLE_CONVERSATIONS:
        out = tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = assistant_mask(messages, tok, template="tokenizer", method=method)
        assert ids.tolist() == list(out["input_ids"])
        assert mask.astype(int).tolist() == list(out["assistant_masks"])
        assert mask.any()


def test_generation_block_ending_inside_a_split_character():
    """Markers around the content only: the span ends on an emoji that byte-level BPE splits into
    several tokens; all of them are trained, as transformers marks them."""
    template = CHATML_MARKERS.replace(
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    assert template != CHATML_MARKERS
    tok = _tokenizer(template)
    for messages in ORACLE_CONVERSATIONS:
        out = tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = assistant_mask(messages, tok, template="tokenizer")
        assert ids.tolist() == list(out["input_ids"])
        assert mask.astype(int).tolist() == list(out["assistant_masks"])
    ids, mask = assistant_mask(ORACLE_CONVERSATIONS[2], tok, template="tokenizer")
    assert tok.decode(ids[mask].tolist()).endswith("🙂 Oui. ")


def test_template_that_rewrites_earlier_turns_is_refused():
    # Like reasoning templates that drop <think> from earlier turns: prefixes are not prefixes.
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tok = _tokenizer(template)
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x</think>a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(DataError, match="generation"):
        assistant_mask(messages, tok, template="tokenizer")


def test_template_rendering_no_assistant_content_is_an_error_not_an_empty_mask():
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{% if m.role != 'assistant' %}{{ m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tok = _tokenizer(template)
    with pytest.raises(DataError, match=r"messages\[1\].*renders nothing"):
        assistant_mask(CONVERSATION[1:3], tok, template="tokenizer")


def test_missing_chat_template_is_an_error():
    tok = _tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        Encoder(DataConfig(template="tokenizer"), tok)


def _row(value, i=0):
    return Row(i, RowRef("mem.jsonl", i, i + 1), value)


def test_row_without_trained_tokens_is_an_error_naming_the_row(tokenizer):
    from jaxft.data.encode import DataStats
    from jaxft.data.rows import Text

    enc = Encoder(DataConfig(append_eos=False), tokenizer)
    with pytest.raises(DataError, match=r"mem.jsonl:4: no token is trained"):
        enc.encode([_row(Text("a"), 3)], DataStats())


def test_preference_pair_shares_the_prompt_and_masks_only_completions(tokenizer):
    from jaxft.data.encode import DataStats

    prompt = [{"role": "user", "content": "Pick one"}]
    pair = Pair(
        prompt,
        [{"role": "assistant", "content": "Good answer."}],
        [{"role": "assistant", "content": "Bad answer, much longer."}],
    )
    (ex,) = Encoder(DataConfig(), tokenizer).encode([_row(pair)], DataStats())
    head = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    for part, text in ((ex.chosen, "Good answer."), (ex.rejected, "Bad answer, much longer.")):
        assert part.prompt_len == len(head)
        assert part.ids[: part.prompt_len].tolist() == list(head)
        want_ids, want_mask = _expected(tokenizer, [(text, 1), ("<|im_end|>", 1), ("\n", 0)])
        assert part.ids[part.prompt_len :].tolist() == want_ids
        assert part.mask[part.prompt_len :].astype(int).tolist() == want_mask
        assert not part.mask[: part.prompt_len].any()


def test_prompt_turns_are_context_only(tokenizer):
    from jaxft.data.encode import DataStats

    # A multi-turn prompt holds an assistant turn: only the completion is trained (KTO, and
    # prompt_completion rows alike).
    prompt = CONVERSATION[:4]
    kto = Kto(prompt, [{"role": "assistant", "content": "Final."}], False)
    chat = Chat(prompt + [{"role": "assistant", "content": "Final."}], train_from=4)
    enc = Encoder(DataConfig(), tokenizer)
    (k, c) = enc.encode([_row(kto, 0), _row(chat, 1)], DataStats())
    assert k.label is False
    for ex in (k.example, c):
        trained = tokenizer.decode(ex.ids[ex.mask].tolist(), skip_special_tokens=False)
        assert trained == "Final.<|im_end|>"


def test_pad_is_never_eos():
    tok = _tokenizer()
    assert resolve_pad_id(tok) == tok.convert_tokens_to_ids("<pad>")
    tok.pad_token = tok.eos_token  # a common setup: pad = eos
    pad = resolve_pad_id(tok)
    assert pad != tok.eos_token_id and tok.convert_ids_to_tokens(pad) == "<pad>"
    with pytest.raises(DataError, match="end-of-sequence"):
        resolve_pad_id(tok, "<|im_end|>")
    assert resolve_pad_id(tok, "<|endoftext|>") == tok.convert_tokens_to_ids("<|endoftext|>")


def test_no_distinct_pad_token_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token=None)),
        eos_token="</s>",
        pad_token="</s>",
    )
    with pytest.raises(DataError, match="no pad token distinct from its EOS"):
        resolve_pad_id(tok)


def test_packed_batches_never_pad_with_eos(tokenizer):
    from jaxft.data import pack

    ids, mask = assistant_mask(CONVERSATION, tokenizer)
    pad = resolve_pad_id(tokenizer)
    batch = pack([(ids, mask)], 256, pad)
    assert (batch["tokens"][batch["segment_ids"] == 0] == pad).all()
    assert pad != tokenizer.eos_token_id
    # <|im_end|> (EOS here) ends every turn; it is a trained target after each assistant turn.
    assert batch["loss_mask"][batch["targets"] == tokenizer.eos_token_id].tolist() == [
        0,
        0,
        1,
        0,
        1,
    ]
