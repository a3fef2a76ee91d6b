"""Throughput of the data pipeline on synthetic chat rows: tokenize + mask + pack.

    .venv/bin/python scripts/bench_data.py [--rows 100000] [--seq-len 2048]
        [--out runs/bench/bench_data.json]

For each way of rendering (built-in ChatML; the tokenizer's template found by prefixes; the same
template with {% generation %} markers) it measures, on the same rows:

- encode: render + tokenize (one batch per window) + loss mask, from parsed rows in memory;
- pack: best-fit-decreasing bins + the int32 row layout;
- end to end: the batch iterator reading JSON lines from disk, single-threaded (prefetch 0).

A second table times the prefix method per conversation length (it renders 2 prefixes per
assistant turn, so its cost grows with turns^2 in characters rendered, never re-tokenizing).
Prints tables and writes JSON; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from jaxft.data import DataConfig, DataStats, Encoder, best_fit_decreasing, pack_rows
from jaxft.data.iterator import BatchIterator
from jaxft.data.rows import Chat
from jaxft.data.sources import Row, RowRef, RowTable, open_sources
from jaxft.data.synthetic import Words, synthetic_chats, tiny_tokenizer

MARKERS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODES = {
    "chatml": {"template": "chatml"},
    "template-prefix": {"template": "tokenizer", "mask_method": "prefix"},
    "template-markers": {"template": "tokenizer", "mask_method": "markers"},
}


def _rows(data: list[dict]) -> list[Row]:
    return [Row(i, RowRef("mem", i), Chat(r["messages"])) for i, r in enumerate(data)]


def bench_mode(name: str, tokenizer, data: list[dict], path: str, args) -> dict:
    if name == "template-markers":
        tokenizer.chat_template = MARKERS_TEMPLATE
    cfg = DataConfig(
        train=path,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        pack_window=args.window,
        prefetch=0,
        num_epochs=1,
        **MODES[name],
    )
    encoder = Encoder(cfg, tokenizer)
    rows = _rows(data)
    stats = DataStats()
    t = time.perf_counter()
    examples: list = []
    for s in range(0, len(rows), args.window):
        examples += encoder.encode(rows[s : s + args.window], stats)
    t_encode = time.perf_counter() - t

    t = time.perf_counter()
    n_rows = 0
    for s in range(0, len(examples), args.window):
        chunk = examples[s : s + args.window]
        bins = best_fit_decreasing([len(e.ids) for e in chunk], args.seq_len)
        pack_rows([(e.ids, e.mask) for e in chunk], bins, args.seq_len, encoder.pad_id)
        n_rows += len(bins)
    t_pack = time.perf_counter() - t

    table = RowTable(open_sources([path]), "auto")
    it = BatchIterator(table, encoder, cfg, np.arange(len(table)), process_index=0, process_count=1)
    t = time.perf_counter()
    real = slots = 0
    for batch in it:
        real += int((batch["segment_ids"] > 0).sum())
        slots += batch["segment_ids"].size
    t_e2e = time.perf_counter() - t
    n, tokens = len(data), stats.tokens
    return {
        "mode": name,
        "rows": n,
        "tokens": tokens,
        "trained_tokens": stats.trained_tokens,
        "truncated": stats.truncated,
        "encode_s": t_encode,
        "pack_s": t_pack,
        "end_to_end_s": t_e2e,
        "encode_rows_per_s": n / t_encode,
        "encode_tokens_per_s": tokens / t_encode,
        "pack_rows_per_s": n / t_pack,
        "pack_tokens_per_s": tokens / t_pack,
        "e2e_rows_per_s": n / t_e2e,
        "e2e_tokens_per_s": it.stats.tokens / t_e2e,
        "packing_efficiency_bfd": tokens / (n_rows * args.seq_len),
        "packing_efficiency_iterator": real / slots,
        "padded_efficiency": tokens / (n * args.seq_len),
    }


def bench_turns(tokenizer) -> list[dict]:
    words = Words(1)
    out = []
    for turns in (1, 2, 4, 8, 16):
        data = []
        for _ in range(200):
            messages = []
            for _ in range(turns):
                messages.append({"role": "user", "content": words.passage(15)})
                messages.append({"role": "assistant", "content": words.passage(30)})
            data.append({"messages": messages})
        row = {"turns": turns}
        for name in ("chatml", "template-prefix"):
            encoder = Encoder(DataConfig(seq_len=1 << 20, **MODES[name]), tokenizer)
            t = time.perf_counter()
            encoder.encode(_rows(data), DataStats())
            row[f"{name}_us_per_row"] = (time.perf_counter() - t) / len(data) * 1e6
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="runs/bench/bench_data.json")
    args = p.parse_args()

    tokenizer = tiny_tokenizer(vocab_size=args.vocab)
    chatml_template = tokenizer.chat_template
    t = time.perf_counter()
    data = list(synthetic_chats(args.rows, seed=0))
    print(f"generated {len(data)} synthetic chat rows in {time.perf_counter() - t:.1f}s")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
        for name in args.modes.split(","):
            tokenizer.chat_template = chatml_template
            results.append(bench_mode(name, tokenizer, data, path, args))
            r = results[-1]
            print(f"  {name}: {r['e2e_rows_per_s']:,.0f} rows/s end to end")
    tokenizer.chat_template = chatml_template
    turns = bench_turns(tokenizer)

    print(f"\n{args.rows} rows, seq_len {args.seq_len}, vocab {args.vocab}, {os.cpu_count()} CPUs")
    head = (
        f"{'mode':<18}{'encode rows/s':>14}{'encode tok/s':>14}{'pack rows/s':>13}"
        f"{'e2e rows/s':>12}{'e2e tok/s':>12}{'packed':>9}{'padded':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['mode']:<18}{r['encode_rows_per_s']:>14,.0f}{r['encode_tokens_per_s']:>14,.0f}"
            f"{r['pack_rows_per_s']:>13,.0f}{r['e2e_rows_per_s']:>12,.0f}"
            f"{r['e2e_tokens_per_s']:>12,.0f}{r['packing_efficiency_iterator']:>9.1%}"
            f"{r['padded_efficiency']:>9.1%}"
        )
    print(f"\n{'assistant turns':<16}{'chatml us/row':>15}{'prefix us/row':>15}")
    for r in turns:
        print(
            f"{r['turns']:<16}{r['chatml_us_per_row']:>15,.0f}{r['template-prefix_us_per_row']:>15,.0f}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "rows": args.rows,
                "seq_len": args.seq_len,
                "vocab": args.vocab,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "results": results,
                "per_turns": turns,
            },
            f,
            indent=1,
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
