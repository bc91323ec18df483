"""``python -m torchgraft``: the command line of :mod:`torchgraft.cli`."""

from torchgraft.cli import main

raise SystemExit(main())
