"""The `anomscan` command line: `main` assembles the command groups."""

from agent.cli.main import main

__all__ = ["main"]
