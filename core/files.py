"""Outputs that are never half-written and never shared between two writers.

Every file anomscan writes goes through `atomic_path`: the writer fills a temporary file
whose name is unique to it (process id and a random token, in the target's folder, so the
final `os.replace` is one atomic rename on the same file system); a reader sees either the
previous file or the new complete one, and two concurrent writers never touch each other's
temporary file (the last rename wins with a complete file).

Two writers of the same output never both succeed: a tool holds `exclusive_output` (an
exclusive `flock` on ``OUTPUT.lock``) for its whole computation, and a second writer of the
same path is refused at once with `OutputInUseError`.

A folder of several files is committed as a whole by `committed_folder`: the files are
written into a unique staging folder beside the target, a manifest (`MANIFEST_NAME`, with
the size and SHA-256 of every file) is written last, and the staging folder replaces the
target with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames
with a roll-back that `recover_folder` completes). A folder that exists and holds files but
no manifest is not ours: it is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from core.errors import InvalidInputError, OutputError, OutputInUseError, StorageError

__all__ = [
    "MANIFEST_NAME",
    "atomic_path",
    "check_regular_file",
    "committed_folder",
    "exclusive_output",
    "file_sha256",
    "json_text",
    "make_parent_folder",
    "read_manifest",
    "read_user_text",
    "recover_folder",
    "remove_dead_temporaries",
    "write_bytes",
    "write_json",
    "write_text",
]

MANIFEST_NAME: Final = "manifest.json"
"""The commit record of a multi-file output: written last, lists every file it owns."""

LOCK_SUFFIX: Final = ".lock"
"""The lock file of an output sits beside it: ``OUTPUT.lock``."""

_TEMP_MARK: Final = ".anomscan-tmp-"
_OLD_MARK: Final = ".anomscan-old-"


def _unique_token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def _check_parent(target: Path, what: str) -> None:
    parent = target.parent
    if target.is_dir():
        raise InvalidInputError(
            f"cannot write the {what} to {target}: it is a folder; give a file name"
        )
    if not parent.is_dir():
        raise InvalidInputError(
            f"cannot write the {what} to {target}: folder {parent} does not exist; create it "
            "or choose another output path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(
            f"cannot write the {what} to {target}: folder {parent} is not writable; choose "
            "another output path"
        )


@contextlib.contextmanager
def atomic_path(path: str | Path, *, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path unique to this writer; on success rename it onto `path`.

    The temporary file sits in the target's folder (same file system) and keeps the target's
    suffix, so libraries that choose a format by suffix (NumPy, uproot) write the same thing.
    On any exception the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    _check_parent(target, what)
    _remove_dead_temporaries(target)
    temporary = target.with_name(f"{_TEMP_MARK}{_unique_token()}-{target.name}")
    try:
        try:
            yield temporary
        except OSError as error:
            if error.filename is None or Path(os.fsdecode(error.filename)) != temporary:
                raise
            raise _write_error(target, what, error) from error
        if not temporary.exists():
            raise OutputError(f"the {what} writer produced no file for {target}")
        _fsync_file(temporary)
        try:
            temporary.replace(target)
        except OSError as error:
            raise OutputError(
                f"cannot write the {what} to {target}: {error.strerror}; choose another path"
            ) from error
        _fsync_folder(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


_STORAGE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _write_error(target: Path, what: str, error: OSError) -> OutputError:
    """The one-line error of a failed write of `target` (disk full, read-only, no such place)."""
    reason = error.strerror or type(error).__name__
    if error.errno in _STORAGE_ERRNOS:
        return StorageError(
            f"cannot write the {what} to {target}: {reason}; free space or choose another folder"
        )
    return OutputError(f"cannot write the {what} to {target}: {reason}; choose another path")


_SPECIAL_KINDS: Final = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path: str | Path, what: str = "input file") -> Path:
    """`path` when it is a regular file; InvalidInputError for a FIFO, device or folder.

    Opening a FIFO blocks until a writer appears and a character device can stream forever,
    so anything but a regular file is refused before it is opened (InvalidInputError).
    """
    source = Path(path)
    try:
        mode = source.stat().st_mode
    except FileNotFoundError as error:
        raise InvalidInputError(f"{what} {source} does not exist; check the path") from error
    except OSError as error:
        raise InvalidInputError(
            f"{what} {source} can not be opened ({error.strerror}); check the path"
        ) from error
    if stat.S_ISDIR(mode):
        raise InvalidInputError(
            f"{what} {source} is a folder, not a file; give the files inside it (e.g. "
            f"{source}/*.root)"
        )
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
        raise InvalidInputError(
            f"{what} {source} is {kind}, not a regular file; give a file on disk"
        )
    return source


@contextlib.contextmanager
def exclusive_output(path: str | Path, *, what: str = "output") -> Iterator[Path]:
    """Hold the exclusive lock of output `path` (``path.lock``) while the body runs.

    The lock is an `flock` on a file beside the output, taken without waiting: a second
    writer of the same output (another process or thread) gets OutputInUseError at once,
    before it computes anything. The output's folder is created first (as every writing
    tool does) so that the lock has a place. The lock file is removed on release; a writer
    that opened a lock file another writer had just removed retries on the new one, so two
    writers never hold locks on two different files of one path. The kernel releases the
    lock of a killed writer.
    """
    target = Path(path)
    lock_path = target.with_name(target.name + LOCK_SUFFIX)
    descriptor = _lock(lock_path, target, what)
    try:
        yield target
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(descriptor)


def _lock(lock_path: Path, target: Path, what: str) -> int:
    make_parent_folder(target, what)
    while True:
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise _write_error(target, what, error) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            os.close(descriptor)
            raise OutputInUseError(
                f"the {what} {target} is being written by another process right now (lock "
                f"{lock_path} is held); wait for it to finish or choose another output path"
            ) from error
        try:
            same = os.fstat(descriptor).st_ino == lock_path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(descriptor, 0)  # a killed writer's lock file may still hold its pid
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)


def make_parent_folder(target: str | Path, what: str = "output") -> None:
    """Create the folder of output `target` (and its parents); InvalidInputError if impossible."""
    path = Path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise InvalidInputError(
            f"cannot write the {what} to {path}: a file is in the way of its folder "
            f"{path.parent}; choose another output path"
        ) from error
    except OSError as error:
        raise InvalidInputError(
            f"cannot write the {what} to {path}: its folder can not be created "
            f"({error.strerror}); choose another output path"
        ) from error


def _remove_dead_temporaries(target: Path) -> None:
    """Remove the temporaries of `target` left by writers that died (SIGKILL, power loss)."""
    remove_dead_temporaries(target.parent, f"{_TEMP_MARK}*-{target.name}")


def remove_dead_temporaries(folder: str | Path, pattern: str = f"{_TEMP_MARK}*") -> None:
    """Remove the temporary files in `folder` (matching `pattern`) of writers that died."""
    for stale in Path(folder).glob(pattern):
        if stale.is_file() and not _owner_alive(stale.name):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError), path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_bytes(path: str | Path, data: bytes, *, what: str = "output") -> Path:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, what=what) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, what: str = "output") -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"), what=what)


def _reject_non_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise OutputError(
            f"refusing to write {value} at {where}: JSON has no NaN or infinity; this is a bug "
            "in the step that computed it"
        )
    if isinstance(value, Mapping):
        for key, item in value.items():
            _reject_non_finite(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _reject_non_finite(item, f"{where}[{index}]")


def json_text(data: Any, *, indent: int | None = 2) -> str:
    """Strict JSON: OutputError names the first NaN or infinity instead of writing `Infinity`."""
    _reject_non_finite(data, "$")
    return json.dumps(data, indent=indent, allow_nan=False, default=str)


def write_json(path: str | Path, data: Any, *, what: str = "output") -> Path:
    """Write `data` as strict JSON (no NaN/Infinity) to `path` atomically."""
    return write_text(path, json_text(data) + "\n", what=what)


MAX_CONFIG_BYTES: Final = 100_000_000
"""Largest configuration file (manifest, mapping, good-run list) anomscan reads as text."""


def read_user_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a user's configuration file; InvalidInputError says what is wrong."""
    source = Path(path)
    if not source.is_file():
        raise InvalidInputError(f"{what} {source} does not exist (or is not a file)")
    if source.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidInputError(
            f"{what} {source} is larger than {MAX_CONFIG_BYTES} bytes; is it the right file?"
        )
    try:
        return source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"{what} {source} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from error
    except OSError as error:  # not the data file's fault: the reader would call it damaged
        raise InvalidInputError(
            f"{what} {source} can not be read ({error.strerror or error}); check that this "
            "user (and, on a cluster, every worker) may read it"
        ) from error


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system can not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OutputError(f"cannot replace folder {second}: {os.strerror(code)}")


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a committed folder, or None when the folder holds none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputError(
            f"manifest {path} is not valid JSON ({error}); remove the folder and rerun"
        ) from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise OutputError(f"manifest {path} has no 'files' table; remove the folder and rerun")
    return manifest


def recover_folder(target: str | Path) -> None:
    """Finish or roll back a folder replacement that was interrupted between its two renames."""
    destination = Path(target)
    parent = destination.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f"{_OLD_MARK}*-{destination.name}"))
    if not destination.exists() and olds:
        olds[-1].rename(destination)
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for stale in parent.glob(f"{_TEMP_MARK}*-{destination.name}"):
        if stale.is_dir() and not _owner_alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name.removeprefix(_TEMP_MARK).split("-", 1)[0])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_foreign(destination: Path, what: str) -> None:
    if destination.exists() and not destination.is_dir():
        raise InvalidInputError(
            f"cannot write the {what} to {destination}: it is a file, not a folder; give a "
            "folder name"
        )
    if destination.is_dir() and read_manifest(destination) is None and any(destination.iterdir()):
        raise InvalidInputError(
            f"cannot write the {what} to {destination}: the folder holds files that anomscan "
            f"did not write (no {MANIFEST_NAME}); give an empty or new folder"
        )


@contextlib.contextmanager
def committed_folder(
    path: str | Path, *, what: str = "output folder", info: Mapping[str, Any] | None = None
) -> Iterator[Path]:
    """Yield a staging folder; on success commit it as `path` with a manifest written last.

    Everything written into the staging folder becomes the new content of `path` at once;
    the previous content of `path` (an earlier committed output) stays whole until then and
    is removed afterwards. A non-empty `path` without a manifest is refused (not ours).
    """
    destination = Path(path).absolute()
    if not destination.parent.is_dir():
        raise InvalidInputError(
            f"cannot write the {what} to {destination}: folder {destination.parent} does not "
            "exist; create it first"
        )
    recover_folder(destination)
    _refuse_foreign(destination, what)
    staging = destination.with_name(f"{_TEMP_MARK}{_unique_token()}-{destination.name}")
    try:
        staging.mkdir()
    except OSError as error:
        raise InvalidInputError(
            f"cannot write the {what} to {destination}: {error.strerror}; choose another folder"
        ) from error
    try:
        yield staging
        files = {
            str(item.relative_to(staging)): {
                "bytes": item.stat().st_size,
                "sha256": file_sha256(item),
            }
            for item in sorted(staging.rglob("*"))
            if item.is_file()
        }
        write_json(staging / MANIFEST_NAME, {"files": files, **dict(info or {})}, what=what)
        _fsync_folder(staging)
        _swap_in(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, destination: Path) -> None:
    if not destination.exists():
        staging.rename(destination)
        _fsync_folder(destination.parent)
        return
    if _exchange(staging, destination):
        _fsync_folder(destination.parent)
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = destination.with_name(f"{_OLD_MARK}{_unique_token()}-{destination.name}")
    destination.rename(old)
    staging.rename(destination)
    _fsync_folder(destination.parent)
    shutil.rmtree(old, ignore_errors=True)
