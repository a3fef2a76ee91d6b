"""Generate answers to held-out prompts and score their JSON validity; write every sample.

Prompt files are JSONL: each row has ``messages`` (a conversation ending before the assistant's
answer) or ``prompt`` (a user message as a string), optionally ``schema`` (an inline JSON
Schema for that row) and ``expected`` (the reference answer, for an exact-match rate). A global schema (``eval.json_schema``) applies to rows without their own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxft.errors import DataError
from jaxft.eval.generate import Sampling, generate_ids, truncate_at_stop
from jaxft.eval.json_metric import score_json, summarize, verdict_dict


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if "messages" not in row and "prompt" not in row:
            raise DataError(f"{path}:{n}: a prompt row needs 'messages' or 'prompt'")
        if "messages" not in row:
            row["messages"] = [{"role": "user", "content": row["prompt"]}]
        rows.append(row)
    return rows


def prompt_ids(tokenizer: Any, messages: Sequence[dict], template: str) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt."""
    if template == "chatml":
        from jaxft.data.chat import render_chatml

        text = render_chatml(messages, add_generation_prompt=True).text
    else:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_token_ids(tokenizer: Any, config: Any) -> list[int]:
    ids = set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = config.eos_token_id
    ids.update(eos if isinstance(eos, tuple) else ([eos] if eos is not None else []))
    return sorted(ids)


def generate_answers(config: Any, params: Any, tokenizer: Any, conversations: list[list[dict]],
                     *, lora: Any = None, sampling: Sampling = Sampling(), template: str = "chatml",
                     batch_size: int = 8, stop: Sequence[str] = (), seed: int = 0) -> list[str]:
    ends = end_token_ids(tokenizer, config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[str] = []
    for i in range(0, len(conversations), batch_size):
        batch = [prompt_ids(tokenizer, m, template) for m in conversations[i:i + batch_size]]
        outs = generate_ids(config, params, batch, lora=lora, sampling=sampling, end_ids=ends,
                            pad_id=pad, seed=seed + i)
        for out in outs:
            text = tokenizer.decode(out, skip_special_tokens=True)
            answers.append(truncate_at_stop(text, stop))
    return answers


def json_eval(config: Any, params: Any, tokenizer: Any, prompts_path: str | Path,
              out_dir: str | Path, *, lora: Any = None, schema_path: str | None = None,
              sampling: Sampling = Sampling(), template: str = "chatml", batch_size: int = 8,
              tag: str = "json") -> dict[str, Any]:
    """Score JSON validity on a prompts file; writes ``{tag}_samples.jsonl`` and ``{tag}.json``."""
    rows = read_prompts(prompts_path)
    schema = json.loads(Path(schema_path).read_text()) if schema_path else None
    answers = generate_answers(config, params, tokenizer, [r["messages"] for r in rows],
                               lora=lora, sampling=sampling, template=template,
                               batch_size=batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verdicts, exact = [], []
    with open(out / f"{tag}_samples.jsonl", "w", encoding="utf-8") as f:
        for row, answer in zip(rows, answers):
            v = score_json(answer, row.get("schema", schema))
            verdicts.append(v)
            record = {"messages": row["messages"], "output": answer, **verdict_dict(v)}
            if "expected" in row:  # exact match of the parsed answer with the reference
                record["exact"] = v.valid_json and json.loads(answer) == row["expected"]
                exact.append(record["exact"])
            f.write(json.dumps(record) + "\n")
    summary = summarize(verdicts)
    if exact:
        summary["exact_match"] = sum(exact) / len(exact)
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=2))
    return summary
