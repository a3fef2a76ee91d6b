"""``jaxft plan CONFIG.yaml [key=value ...]``: memory and FLOPs of a run, before it starts."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="estimate memory per device and FLOPs per token")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices to plan for (default: the devices visible here)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxft.config import load_config
    from jaxft.train.plan import format_report, plan

    cfg = load_config(args.config, args.overrides)
    print(format_report(plan(cfg, args.devices or jax.device_count())))
    return 0
