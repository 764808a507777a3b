"""`refit ui`: a Prefect server that stays up in the background, for reviewing runs in a browser.

`start_server` runs `prefect server start` as a detached process (its own session, so it
outlives the command and a Ctrl-C in the terminal), logging to `<state>/server.log`, with its
pid and address in `<state>/server.json`; `<state>` is `$REFIT_HOME/ui`, by default
`~/.refit/ui/`. The server uses Prefect's configured database (by default
`~/.prefect/prefect.db`, the one the temporary servers of `refit run` write to as well), so
runs recorded before it was started show up in it too. `refit run`, `refit demo` and
`refit sweep` record into it while it runs (`recording_into`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

DEFAULT_PORT = 4200
HOST = "127.0.0.1"


class UIError(RuntimeError):
    """The UI server could not be started."""


def state_dir() -> Path:
    return Path(os.environ.get("REFIT_HOME") or Path.home() / ".refit") / "ui"


def _state_file() -> Path:
    return state_dir() / "server.json"


def _read_state() -> dict | None:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers at url (the UI's address, without /api)."""
    try:
        return httpx.get(f"{url}/api/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def running_server() -> str | None:
    """The UI URL of the server `refit ui` started, if it still answers."""
    state = _read_state()
    return state["url"] if state and is_healthy(state["url"]) else None


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


def start_server(port: int = DEFAULT_PORT, timeout: float = 180.0) -> tuple[str, bool]:
    """(UI URL, whether this call started it): the running server when there is one, else a
    new `prefect server start` in the background, once its API answers. A start that does not
    finish (an error, the timeout, a Ctrl-C) stops the server it started."""
    url = f"http://{HOST}:{port}"
    state = _read_state()
    if state and is_healthy(state["url"]):
        return state["url"], False
    if state and state["pid"] and _is_live_server(state["pid"]):  # a start cut short by a kill, or still going
        raise UIError(
            f"the server `refit ui` started at {state['url']} (pid {state['pid']}) does not answer: wait for it, "
            "or stop it with `refit ui --stop`"
        )
    if is_healthy(url):  # a Prefect server started some other way: record into it, but never stop it
        _write_state({"url": url, "pid": None, "log": None})
        return url, False
    if _port_in_use(port):
        raise UIError(f"port {port} is in use by something that is not a Prefect server: choose another with --port")
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    # the UI's pages call the API at PREFECT_UI_API_URL, which otherwise names the default port
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"{url}/api"}
    env.pop("PREFECT_API_URL", None)  # the server serves its own API; it is no client of another
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        # recorded before the wait: if this process is killed while waiting, `refit ui --stop` still stops it
        _write_state({"url": url, "pid": process.pid, "log": str(log_path)})
        deadline = time.time() + timeout
        while not is_healthy(url):
            if process.poll() is not None or time.time() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise UIError(
                    f"the Prefect server did not start (exit code {process.poll()}); {log_path} ends:\n{tail}"
                )
            time.sleep(0.5)
    except BaseException:
        _stop_group(process.pid)
        _state_file().unlink(missing_ok=True)  # after the stop: a second Ctrl-C during it leaves it to --stop
        raise
    return url, True


def _write_state(state: dict) -> None:
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps(state))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _is_live_server(pid: int) -> bool:
    return _alive(pid) and _is_prefect_server(pid)


def _is_prefect_server(pid: int) -> bool:
    """Whether pid is still a Prefect server, not another process that reuses the number."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # no /proc (macOS): trust the pid
        return True
    return b"prefect" in command and b"server" in command


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group has not exited (a zombie has)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no /proc (macOS): whether the group can still be signalled
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # gone while read
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def _stop_group(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the server's process group (server and workers), SIGKILL after the grace period
    whatever of the group is left: not only the server, whose workers may outlive it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # reaps it when this process started it
            except ChildProcessError:
                pass
            if not _group_alive(pid):
                return
            time.sleep(0.2)


def stop_server() -> str:
    """Stop the server `refit ui` started; what happened, in words."""
    state = _read_state()
    if state is None:
        return "no Refit UI server is running"
    _state_file().unlink()
    if state["pid"] is None:
        return f"the server at {state['url']} was not started by `refit ui`: stop it where it was started"
    if not _is_live_server(state["pid"]):
        return f"the Refit UI server at {state['url']} was no longer running"
    _stop_group(state["pid"])
    return f"stopped the Refit UI server at {state['url']} (pid {state['pid']})"


@contextmanager
def recording_into(start: bool = False) -> Iterator[str | None]:
    """Point Prefect at the server the runs inside should be recorded into, and say which: the
    one PREFECT_API_URL names, else the `refit ui` server when it runs (started first if `start`),
    else none (Prefect then starts a temporary server for the run). Yields the UI URL of a
    server that stays, or None."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        print(f"recording into the Prefect server at {configured} (PREFECT_API_URL)", flush=True)
        yield configured.removesuffix("/").removesuffix("/api")
        return
    if start:
        url, started = start_server()  # the running one, if any
        if started:
            print(f"started the Refit UI server at {url} (it stays up; `refit ui --stop` stops it)", flush=True)
    else:
        url = running_server()
    if url is None:
        print("recording on a temporary Prefect server (`refit ui` starts one that stays)", flush=True)
        yield None
        return
    print(f"recording into the Refit UI server at {url}", flush=True)
    with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
        yield url


def flow_run_url(ui: str, flow_run_id: str) -> str:
    return f"{ui}/runs/flow-run/{flow_run_id}"


def artifact_url(ui: str, key: str, flow_run_id: str | None = None) -> str | None:
    """The page of the newest artifact with this key, made by this flow run when one is named
    (None if there is none)."""
    artifacts = {"key": {"any_": [key]}}
    if flow_run_id is not None:
        artifacts["flow_run_id"] = {"any_": [str(flow_run_id)]}
    response = httpx.post(
        f"{ui}/api/artifacts/filter", json={"artifacts": artifacts, "sort": "CREATED_DESC", "limit": 1}, timeout=30
    )
    response.raise_for_status()
    found = response.json()
    return f"{ui}/artifacts/artifact/{found[0]['id']}" if found else None


def browse(url: str, *options: str) -> str:
    """Load a page in headless Chromium (Debian's `chromium`) and return its DOM once the UI's
    scripts have run (virtual time lets the app's API calls finish)."""
    browser = shutil.which("chromium")
    if browser is None:
        raise UIError("chromium is not installed (Debian: apt-get install chromium)")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000", *options, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def screenshot(url: str, path: Path) -> None:
    """Save a PNG of the page at url, as a reviewer's browser shows it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    browse(url, f"--screenshot={path.resolve()}", "--window-size=1280,1600")
    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise UIError(f"chromium wrote no PNG to {path}")
