"""The ``jaxft`` command line: thin commands over the library.

Each command lives in its own module exposing ``add_parser(subparsers)``, which registers an
``argparse`` sub-parser and sets ``func`` to a callable ``run(args) -> int``.
"""
