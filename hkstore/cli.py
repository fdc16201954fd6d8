"""The ``hkstore`` command (no jax imported here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hkstore._version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed check, 2 usage/input)."""
    parser = argparse.ArgumentParser(prog="hkstore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hkstore {__version__}")
    parser.add_argument("verb", nargs="?")
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    print(f"hkstore: '{args.verb}' is not available yet", file=sys.stderr)
    return 2
