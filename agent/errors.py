"""The one error path of the command line: every failure ends in one line and a known status.

- an anticipated failure (any `AnomscanError`, a pydantic `ValidationError`, bad JSON, a
  path the file system refuses: too long, not permitted, read-only, full): exit 2 and one
  line saying what is wrong, where, and what to do; the line is a sentence, not a class name;
- anything else is a bug: exit 1, one line naming the error and the path of a log file
  that holds the traceback (``$ANOMSCAN_LOG_DIR``, default ``~/.local/state/anomscan/logs``);
- Ctrl-C: exit 130, "interrupted"; outputs are written atomically, so nothing half-written
  is left behind.

No traceback reaches the terminal, and messages carry no install paths.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from core.errors import AnomscanError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_INPUT",
    "InternalError",
    "guarded",
    "one_line",
    "path_error_text",
    "validation_summary",
]

EXIT_INVALID_INPUT: Final = 2
EXIT_FAILURE: Final = 1
EXIT_INTERRUPTED: Final = 130
_MAX_LINE: Final = 600


class InternalError(Exception):
    """A state that correct code never reaches (reported with exit 1 and a log)."""


def _install_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    roots.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    return sorted((r for r in roots if r and len(r) > 1), key=len, reverse=True)


def one_line(text: str) -> str:
    """`text` as one line without install paths, shortened to a readable length."""
    for root in _install_roots():
        text = text.replace(root, "<install>")
    text = re.sub(r"\s*\n\s*", "; ", text.strip())
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 3] + "..."


def validation_summary(error: ValidationError) -> str:
    """Each failed field of a pydantic error as `field: message (got value)`, in one line."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item.get("loc", ())) or "input"
        value = repr(item.get("input"))
        if len(value) > 60:
            value = value[:57] + "..."
        parts.append(f"{where}: {item.get('msg', 'invalid')} (got {value})")
    shown = "; ".join(parts[:5])
    if len(parts) > 5:
        shown += f"; and {len(parts) - 5} more"
    return shown


def _log_folder() -> Path:
    configured = os.environ.get("ANOMSCAN_LOG_DIR")
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "anomscan" / "logs"


def _write_log(error: BaseException, argv: list[str]) -> Path:
    text = (
        f"anomscan {' '.join(argv)}\n{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n\n"
        + "".join(traceback.format_exception(error))
    )
    for folder in (_log_folder(), Path(tempfile.gettempdir()) / "anomscan-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"error-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
        except OSError:
            continue
        return path
    return Path("(no writable log folder)")


def guarded(command: Callable[[], int], argv: list[str]) -> int:
    """Run `command` and map every outcome to an exit status and at most one stderr line."""
    try:
        return command()
    except KeyboardInterrupt:
        print("anomscan: interrupted; no partial output was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout (`| head`) stopped reading: nothing is wrong with the command.
        # Point stdout at /dev/null so the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except ValidationError as error:
        print(f"anomscan: invalid input: {one_line(validation_summary(error))}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except AnomscanError as error:
        print(f"anomscan: {one_line(str(error) or type(error).__name__)}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except OSError as error:
        message = path_error_text(error)
        if message is None:
            return _internal(error, argv)
        print(f"anomscan: {one_line(message)}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except Exception as error:  # the one place where a bug is turned into a report
        return _internal(error, argv)


def _internal(error: Exception, argv: list[str]) -> int:
    log = _write_log(error, argv)
    message = one_line(f"{type(error).__name__}: {error}")
    print(
        f"anomscan: internal error ({message}); this is a bug, please report it with the "
        f"traceback in {log}",
        file=sys.stderr,
    )
    return EXIT_FAILURE


_PATH_ERRNOS: Final = {
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows (255 bytes per "
    "folder or file name); shorten it",
    errno.EACCES: "permission denied; choose a path you may read or write",
    errno.EPERM: "operation not permitted; choose another path",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.ENOSPC: "the disk is full; free space or choose another folder",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another folder",
    errno.EISDIR: "it is a folder; give a file",
    errno.ENOTDIR: "a part of it is a file, not a folder; check the path",
    errno.ELOOP: "it has too many symbolic links (a loop?); check the path",
}
"""File-system failures of a path the user gave: anticipated, exit 2 with what to do."""


def path_error_text(error: OSError) -> str | None:
    """One line for an OSError about a user's path (too long, not permitted, ...), else None."""
    advice = _PATH_ERRNOS.get(error.errno or 0)
    if advice is None or error.filename is None:
        return None
    name = os.fsdecode(error.filename)
    if len(name) > 120:
        name = name[:60] + "..." + name[-40:]
    return f"cannot use the path {name}: {advice}"
