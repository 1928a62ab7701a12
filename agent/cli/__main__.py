"""`python -m agent.cli`: the `anomscan` command in a fresh interpreter."""

import sys

from agent.cli.main import main

sys.exit(main())
