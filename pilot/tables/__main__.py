"""``python -m pilot.tables RESULTS_DIR...``: runs the command line of ``pilot.tables.cli``."""

from pilot.tables.cli import main

raise SystemExit(main())
