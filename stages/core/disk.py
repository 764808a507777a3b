"""A full disk, however the library that hit it reports it, as one line naming the stage and
the place: `Stage.run` translates it for every stage."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# what libraries that raise no OSError say: DuckDB, SQLite, Arrow, a training process's reason
FULL_DISK_TEXTS = ("No space left on device", "database or disk is full", "Disk quota exceeded")


class DiskFull(RuntimeError):
    """A stage ran out of disk space; its previous output is unchanged."""


def full_disk_cause(error: BaseException | None) -> BaseException | None:
    """The exception in error's chain that says the disk (or a quota) is full, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return error
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        if any(text in str(error) for text in FULL_DISK_TEXTS):
            return error
        error = error.__cause__ or error.__context__
    return None


def full_disk_line(text: str) -> str | None:
    """The line of `text` that tells of a full disk, if any (some errors, DCP's, carry whole
    tracebacks of other processes in their text; a training launcher's log is a text too)."""
    said = (line.strip() for line in str(text).splitlines())
    return next((line[:200] for line in said if any(full in line for full in FULL_DISK_TEXTS)), None)


def no_space(cause: BaseException, where: str | None) -> str:
    """`no space left on device writing WHERE (the line that says so)`."""
    writing = f" writing {where}" if where else ""
    return f"no space left on device{writing} ({full_disk_line(str(cause)) or type(cause).__name__})"


@contextmanager
def full_disk_reported(stage: str, folder: Path) -> Iterator[None]:
    """Raise DiskFull, one line, for a full disk anywhere in the block; other errors pass."""
    try:
        yield
    except BaseException as error:
        cause = full_disk_cause(error)
        if cause is None or isinstance(error, DiskFull):
            raise
        where = getattr(cause, "filename", None) or f"{folder}.tmp"
        raise DiskFull(
            f"{stage}: {no_space(cause, where)}: free space and rerun; the previous {stage} output in {folder} is "
            "unchanged"
        ) from error
