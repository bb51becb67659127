"""``python -m hansa`` runs the command line."""

from hansa.node.cli import main

raise SystemExit(main())
