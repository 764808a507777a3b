"""Refit pipeline stages: pure functions, no Prefect imports."""

import os
import signal


def _default_sigterm() -> None:
    """Worker processes forked by a stage (datatrove's pool and manager, tokenize's pool) must
    die when their pool terminates them. An orchestrator's SIGTERM handler in the parent
    (Prefect's raises an exception) would otherwise be inherited and leave them hanging."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm)
