"""Run a data iterator in its own process (for the resume and multi-process tests).

    python iter_worker.py CONFIG_JSON TOKENIZER_DIR OUT.npz [--restore STATE.json]
        [--take N] [--process-index P --process-count C]

Writes the batches it took to OUT.npz (keys "{i}/{field}") and its final state to OUT.state.json.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from jaxft.data import DataConfig, build_iterators, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("tokenizer")
    p.add_argument("out")
    p.add_argument("--restore")
    p.add_argument("--take", type=int, default=-1)
    p.add_argument("--process-index", type=int, default=0)
    p.add_argument("--process-count", type=int, default=1)
    args = p.parse_args()
    cfg = DataConfig(**json.loads(args.config))
    train, _ = build_iterators(
        cfg,
        load_tokenizer(args.tokenizer),
        process_index=args.process_index,
        process_count=args.process_count,
    )
    with train:
        if args.restore:
            with open(args.restore) as f:
                train.restore(json.load(f))
        batches = list(train if args.take < 0 else itertools.islice(train, args.take))
        state = train.state()
    np.savez(args.out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    with open(args.out + ".state.json", "w") as f:
        json.dump(state, f)


if __name__ == "__main__":
    main()
