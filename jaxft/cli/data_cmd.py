"""``jaxft data inspect CONFIG [key=value ...]``: what the data section turns into."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect the data a config describes")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    q = data_sub.add_parser(
        "inspect", help="rows, tokens, trained fraction, packing, lengths, preference balance"
    )
    q.add_argument("config", help="run config (YAML)")
    q.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=1024")
    q.add_argument("--split", choices=("train", "validation"), default="train")
    q.add_argument(
        "--out",
        default=None,
        help="directory for the histogram and report.json (default: "
        "<train.output_dir>/data-inspect)",
    )
    q.add_argument("--examples", type=int, default=3, help="rendered examples to show")
    q.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="highlight trained tokens with ANSI colours",
    )
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from jaxft.config import load_config
    from jaxft.data.inspect import format_report, inspect_data
    from jaxft.data.tokens import load_tokenizer
    from jaxft.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    tokenizer_dir = cfg.model.tokenizer or cfg.model.path
    if tokenizer_dir is None:
        raise ConfigError(
            f"{args.config}: set model.tokenizer (or model.path) to a tokenizer directory"
        )
    run_dir = getattr(getattr(cfg, "train", None), "output_dir", None) or "runs/default"
    out = args.out or os.path.join(run_dir, "data-inspect")
    report = inspect_data(
        cfg.data, load_tokenizer(tokenizer_dir), out, split=args.split, n_examples=args.examples
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"report_{args.split}.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(format_report(report, color=color))
    print(f"report: {os.path.join(out, f'report_{args.split}.json')}")
    return 0
