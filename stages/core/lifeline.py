"""Processes that die with the process that started them; forked workers too, obeying SIGTERM.

A run's helpers must not outlive it: a training process reparented to PID 1 keeps writing
checkpoints into the workdir, and a temporary Prefect server keeps its port. Killing the
run's process group does not reach them (the training launcher runs in a session of its own,
so that Ctrl-C reaches only the stage, which then stops it in order; torchrun starts each
rank in a session of its own too), and killing the run's main process alone reaches nothing.
So each of them asks the kernel for a parent-death signal (`prctl(PR_SET_PDEATHSIG)`):

    python -m refit.stages.core.lifeline PARENT_PID MODULE [ARGS ...]

runs MODULE as `python -m MODULE ARGS` would, in a process that is SIGKILLed when PARENT_PID
exits, and tells MODULE's own children, through LAUNCHER_ENV, to die with it in turn: the
training processes started by `accelerate launch` call `die_with_launcher()` first thing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import sys
import threading
from typing import Iterator

LAUNCHER_ENV = "REFIT_LIFELINE_LAUNCHER"  # pid of a process run under the lifeline, for its children
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(expected_parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits. If the parent is already
    not `expected_parent` (it exited before the request took effect, and this process was
    reparented), die now, as the signal would have made it.

    The kernel sends the signal when the parent *thread* that started this process ends, so
    the parent must start it from a thread that outlives it: its main thread, or one that
    waits for it (as `run_train` does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGKILL)


def die_with_launcher() -> None:
    """In a process started by a program running under the lifeline (`accelerate launch`, for
    the training processes): die with that program. Does nothing in a process started otherwise,
    or in the lifeline's own process (a training process started without a launcher), which
    already dies with its parent."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and int(launcher) != os.getpid():
        die_with_parent(int(launcher))


def command(module: str, *args: str) -> list[str]:
    """`python -m module args` as a process that dies with this one."""
    return [sys.executable, "-m", __name__, str(os.getpid()), module, *args]


def follow_parent(parent: int) -> None:
    """Make a forked worker die with `parent`, the stage process that forked it (a pool worker
    whose stage is killed would otherwise wait for work forever), and give it SIGTERM's default
    action: the parent's handler is inherited with the fork, and an orchestrator's (Prefect's
    raises an exception in the flow) would keep it alive when its pool terminates it, hanging
    the stage. A pool initializer, given the stage's `os.getpid()`."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent)


_open_blocks = 0  # `forked_workers_follow_parent` blocks open in this process
_forking_pid = 0  # the process about to fork: the child's expected parent
_blocks_lock = threading.Lock()
_hook_installed = False


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _open_blocks
    if _open_blocks:
        _open_blocks = 0  # the child's own forks are outside its parent's block
        follow_parent(_forking_pid)


@contextlib.contextmanager
def forked_workers_follow_parent() -> Iterator[None]:
    """Processes forked while this block is open (by a library that takes no pool initializer,
    such as datatrove's executor with its pool and manager) `follow_parent` this process. The
    fork hook this needs is installed by the first block and acts only inside blocks."""
    global _open_blocks, _hook_installed
    with _blocks_lock:
        if not _hook_installed:
            os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
            _hook_installed = True
        _open_blocks += 1
    try:
        yield
    finally:
        with _blocks_lock:
            _open_blocks -= 1


def main(argv: list[str]) -> None:
    parent, module, *args = argv
    die_with_parent(int(parent))
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
