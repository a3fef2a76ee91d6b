"""``python -m jaxft``."""

from jaxft.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
