"""`python -m vmbus`: the command line."""

from vmbus.cli import main

raise SystemExit(main())
