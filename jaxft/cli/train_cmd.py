"""``jaxft train CONFIG.yaml [key=value ...]``: run or resume a training run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (SFT: full, LoRA, QLoRA); resumes automatically")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-process)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxft.config import load_config
    from jaxft.train.distributed import maybe_initialize

    cfg = load_config(args.config, args.overrides)
    maybe_initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxft.train.loop import summary, train

    result = train(cfg, progress=not args.no_progress)
    import jax

    if jax.process_index() == 0:
        print(summary(result))
    return 0
