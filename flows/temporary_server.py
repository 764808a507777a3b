"""The temporary Prefect server that `refit run`, `refit demo` and `refit sweep` start when
PREFECT_API_URL names none, made to die with the refit process.

Prefect starts it as a uvicorn child process and stops it at exit (atexit), which a SIGKILL
skips: the server would stay behind, holding its port. Here it runs under the lifeline
(stages/core/lifeline.py), so the kernel kills it when refit exits in any way, and only then. It is started
from the main thread (the parent-death signal follows the thread that started the process)
before the flow, and registered as Prefect's default temporary server, which Prefect's
clients then find running.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings

from refit.stages.core import lifeline


class _ServerDyingWithRefit(SubprocessASGIServer):
    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # Prefect's own command and environment (prefect/server/api/server.py), under the lifeline,
        # and in a session of its own: a SIGTERM or Ctrl-C to refit's process group must not stop
        # the server while refit still reports the run's end to it (its client would retry for minutes)
        return subprocess.Popen(
            start_new_session=True,
            args=lifeline.command(
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ),
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
        )


def start_temporary_server() -> None:
    """Start the temporary server now, unless PREFECT_API_URL names a server. Call it from the
    main thread, before anything talks to Prefect."""
    if PREFECT_API_URL.value():
        return
    server = _ServerDyingWithRefit()  # registered as the default (port None) instance Prefect's clients use
    if not isinstance(server, _ServerDyingWithRefit):
        raise RuntimeError("Prefect's temporary server was started before refit's own: it would not die with refit")
    server.start()
