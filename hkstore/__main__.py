"""``python -m hkstore``: the command-line interface."""

from hkstore.cli import main

raise SystemExit(main())
