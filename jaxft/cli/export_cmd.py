"""``jaxft export RUN_DIR --format hf|peft|bnb-nf4 --out DIR``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run (merged HF, PEFT adapter, bnb NF4)")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["hf", "peft", "bnb-nf4", "gguf"])
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="auto",
                   help="best | latest | STEP | auto (best if any, else latest)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxft.train.exporting import export_run

    out = export_run(args.run_dir, args.format, args.out, args.checkpoint)
    print(f"wrote {args.format} export to {out}")
    return 0
