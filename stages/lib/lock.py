"""One run at a time per workdir: an advisory lock on `<workdir>/.refit.lock`.

Two runs interleaving on one workdir (a nightly refresh and a hand rerun, say) could swap
outputs under each other. The lock is `flock`-based, so the kernel releases it when the
holder dies, even by SIGKILL: a crashed run never leaves a stale lock behind. The file
names the holder, for the message the second run prints.
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


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another run"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"{info.get('what', 'another run')} (pid {info.get('pid')} on {info.get('host')}, since {started})"


_held: set[int] = set()  # lock descriptors held by this process


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


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


@contextlib.contextmanager
def workdir_lock(workdir: Path, what: str, wait: bool = False, poll: float = 1.0) -> Iterator[None]:
    """Hold the workdir for `what`; if another run holds it, wait for it or raise WorkdirBusy."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
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
        _held.add(fd)
        _write(fd, json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        try:
            yield
        finally:
            _write(fd, "")
            _held.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
