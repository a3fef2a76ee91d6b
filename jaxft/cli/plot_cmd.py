"""``jaxft plot RUN_DIR``: redraw a run's plots from its metrics (also while it trains)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw loss / learning-rate (and reward) plots of a run")
    p.add_argument("run_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxft.errors import JaxftError
    from jaxft.train.metrics import plot_preference, plot_run

    run_dir = Path(args.run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise JaxftError(f"{metrics}: no metrics yet (is {run_dir} a run directory?)")
    written = [p for p in (plot_run(metrics, run_dir / "loss.png"),
                           plot_preference(metrics, run_dir / "preference.png")) if p]
    for p in written:
        print(f"wrote {p}")
    return 0
