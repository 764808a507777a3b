"""One run at a time per workdir: an advisory lock on `<workdir>/.refit.lock`.

Two runs interleaving on one workdir (a nightly refresh and a hand rerun, say) could swap
outputs under each other. The lock is `flock`-based, so the kernel releases it when the
holder dies, even by SIGKILL: a crashed run never leaves a stale lock behind. The file
names the holder, for the message the second run prints: the run, and every process that
holds the lock (a child passed the lock, like the training launcher, keeps it until it
exits), so that the message names a live one even when the run itself has just died.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".refit.lock"


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path: Path) -> str:
    """The run holding the lock, as its file names it, or why the file does not say."""
    try:
        text = path.read_text()
    except OSError as error:
        return f"another run (holder unknown: {path} cannot be read: {error.strerror})"
    if not text.strip():  # the holder is between taking the lock and writing its record, or releasing it
        return f"another run (holder unknown: {path} is empty)"
    try:
        info = json.loads(text)
        what, host, pids = info["what"], info["host"], [int(pid) for pid in info["pids"]]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        first = pids[0]
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, OSError):  # not a record this module wrote
        return f"another run (holder unknown: {path} holds no holder record)"
    live = [pid for pid in pids if _alive(pid)] if host == socket.gethostname() else pids
    who = f"pid {(live or pids)[0]}"
    if live and live[0] != first:  # the run died; a child it passed the lock to has not yet
        who += f", started by pid {first}, which has exited"
    return f"{what} ({who} on {host}, since {started})"


_held: dict[int, dict] = {}  # lock descriptor held by this process -> the holder record in its file


def _drop_inherited() -> None:
    """A forked worker (datatrove's, tokenize's) must not keep its parent's lock alive: if the
    parent is killed, its orphaned workers would otherwise hold the workdir until they exit.
    Closing the child's copy leaves the parent's lock in place."""
    for fd in list(_held):
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited)


def held_locks() -> tuple[int, ...]:
    """Descriptors of the workdir locks this process holds, for a child that must hold them too."""
    return tuple(sorted(_held))


def record_lock_holder(pid: int) -> None:
    """Name `pid` (a child that was passed `held_locks()`) as a holder of every lock this
    process holds: if this process dies first, the busy message names the child."""
    for fd, record in _held.items():
        record["pids"].append(pid)
        _write(fd, json.dumps(record))


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def _acquire(fd: int, workdir: Path, wait: bool, poll: float) -> None:
    path = workdir / LOCK_FILE
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not wait:
                raise WorkdirBusy(
                    f"{workdir} is in use by {_holder(path)}; nothing was changed. Wait for it to "
                    f"finish, or rerun with --wait to queue behind it."
                ) from None
            if not announced:
                print(f"waiting for {_holder(path)} to release {workdir}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(poll)


def _open(workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    return os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)


def check_workdir_free(workdir: Path, wait: bool = False, poll: float = 1.0) -> None:
    """Raise WorkdirBusy (or wait) now if another run holds the workdir, without holding it:
    for a caller about to start something slow (a Prefect server) before its run takes the lock."""
    fd = _open(Path(workdir))
    try:
        _acquire(fd, Path(workdir), wait, poll)
    finally:
        os.close(fd)  # releases the lock if it was taken


@contextlib.contextmanager
def workdir_lock(workdir: Path, what: str, wait: bool = False, poll: float = 1.0) -> Iterator[None]:
    """Hold the workdir for `what`; if another run holds it, wait for it or raise WorkdirBusy."""
    workdir = Path(workdir)
    fd = _open(workdir)
    try:
        _acquire(fd, workdir, wait, poll)
        record = {"what": what, "pids": [os.getpid()], "host": socket.gethostname(), "started": time.time()}
        try:
            _write(fd, json.dumps(record))
        except OSError as error:  # a full disk, most likely: say which file
            raise OSError(error.errno, error.strerror, str(workdir / LOCK_FILE)) from error
        _held[fd] = record
        try:
            yield
        finally:
            _write(fd, "")
            _held.pop(fd, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
