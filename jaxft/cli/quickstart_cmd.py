"""``jaxft quickstart``: the embedded end-to-end default (tiny model, CPU, offline)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the embedded end-to-end default (CPU, offline)")
    p.add_argument("--out", default="runs/quickstart",
                   help="output directory (a previous quickstart there is replaced)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"],
                   help="tiny: a few minutes on 2 CPU cores; small: a bigger model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxft.quickstart import run_quickstart

    run_quickstart(args.out, args.preset, args.seed, progress=not args.no_progress)
    return 0
