"""Entry point of the ``jaxft`` command.

Sub-commands are registered from the modules listed in ``_COMMANDS``; each module exposes
``add_parser(subparsers)`` and keeps its heavy imports (jax, transformers) inside ``run`` so that
``jaxft --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxft.errors import JaxftError

# Module names under jaxft.cli, in the order they are listed by --help.
_COMMANDS = (
    "quickstart_cmd",
    "train_cmd",
    "eval_cmd",
    "generate_cmd",
    "export_cmd",
    "plan_cmd",
    "data_cmd",
    "plot_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxft",
        description="Fine-tune Llama-family models with JAX: LoRA, QLoRA (NF4), DoRA, full.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"jaxft.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except JaxftError as e:
        print(f"jaxft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
