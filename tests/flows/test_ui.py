"""`refit ui`: a Prefect server that stays, runs recorded into it, and the audit artifact's page
in a real browser (headless Chromium from Debian's `chromium` package). It saves its
screenshot as `docs/audit-artifact.png` (not tracked; docs/operating.md shows the demo's)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import LENIENT, REPO, free_port, prepare

from refit.flows.refresh import STAGE_FLOWS
from refit.flows.ui import UIError, browse, is_healthy, start_server
from refit.stages.core.config import load_recipe

SCREENSHOT = REPO / "docs" / "audit-artifact.png"


def chromium() -> str:
    """The headless browser: Debian's chromium, installed here when missing if root and apt can."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, capture_output=True)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium, and it cannot be installed here (needs root and apt-get): apt-get install chromium")
    return found


@pytest.fixture
def refit_env(tmp_path):
    """An environment for `refit` subprocesses with their own Refit state and Prefect database."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return {**env, "REFIT_HOME": str(tmp_path / "refit-home"), "PREFECT_HOME": str(tmp_path / "prefect-home")}


def refit(env: dict, *args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "refit.flows.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def recorded_refreshes(url: str) -> int:
    response = httpx.post(f"{url}/api/flow_runs/filter", json={"flows": {"name": {"any_": ["refit-refresh"]}}})
    response.raise_for_status()
    return len(response.json())


def served_deployments(env: dict, recipe: Path, url: str, log: Path, expected: set[str], timeout: float = 120) -> set:
    """Start `refit serve` on the recipe; the names of the deployments registered at url once
    the expected ones are all there (`serve` registers them one at a time), or all it
    registered by the timeout. It is then stopped."""
    command = [sys.executable, "-m", "refit.flows.cli", "serve", str(recipe)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        names: set[str] = set()
        while time.time() < deadline and process.poll() is None and not expected <= names:
            time.sleep(1)
            names = {d["name"] for d in httpx.post(f"{url}/api/deployments/filter", json={}).json()}
        assert f"recording into the Refit UI server at {url}" in log.read_text(), log.read_text()
        return names
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_ui_stays_runs_record_into_it_and_the_audit_renders_in_a_browser(tmp_path, tiny_model_dir, refit_env):
    chromium()
    path, workdir = prepare(tmp_path, tiny_model_dir, validation_fraction=0.3, gates=LENIENT)
    before = refit(refit_env, "run", str(path), "--workdir", str(workdir))
    assert "recording on a temporary Prefect server" in before and "in the Prefect UI:" not in before
    assert refit(refit_env, "ui", "--stop").strip() == "no Refit UI server is running"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        assert f"started the Prefect UI at {url}" in refit(refit_env, "ui", "--port", str(port))
        assert f"already running: the Prefect UI at {url}" in refit(refit_env, "ui", "--port", str(port))
        assert recorded_refreshes(url) == 1  # the run made before the server started is in it

        out = refit(refit_env, "run", str(path), "--workdir", str(workdir))  # every stage cached: seconds
        assert f"recording into the Refit UI server at {url}" in out
        assert recorded_refreshes(url) == 2
        assert re.search(rf"flow run: {re.escape(url)}/runs/flow-run/[0-9a-f-]{{36}}", out), out
        audit_page = re.search(rf"audit: +({re.escape(url)}/artifacts/artifact/[0-9a-f-]{{36}})", out)
        assert audit_page, out

        dom = browse(audit_page.group(1), "--dump-dom")
        tables = re.findall(r"<table.*?</table>", dom, flags=re.S)
        assert any("forgetting:old" in t and "average_accuracy_gain" in t for t in tables), "no gates table"
        assert re.search(r'<img[^>]+src="data:image/png;base64,', dom), "no plot image on the page"

        # `refit serve` serves into the server that stays
        name = load_recipe(path).name
        expected = {f"{name}-nightly", *(f"{name}-{stage}" for stage in STAGE_FLOWS)}  # a rerun one per stage
        assert served_deployments(refit_env, path, url, tmp_path / "serve.log", expected) == expected

        SCREENSHOT.unlink(missing_ok=True)
        shot = refit(refit_env, "ui", "--screenshot", str(SCREENSHOT), "--recipe-name", load_recipe(path).name)
        assert f"saved {SCREENSHOT}: {audit_page.group(1)}" in shot  # the newest audit is this run's
        assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stopped = refit(refit_env, "ui", "--stop")
    assert stopped.startswith(f"stopped the Refit UI server at {url}")
    assert refit(refit_env, "ui", "--stop").strip() == "no Refit UI server is running"


def test_a_port_outside_1_to_65535_is_refused_in_one_line(capsys):
    from refit.flows.cli import main

    for port, why in (("99999", "'99999' is not a port number from 1 to 65535"), ("0", "0 (any free port) is not")):
        with pytest.raises(SystemExit) as exited:
            main(["ui", "--port", port])
        assert exited.value.code == 2
        assert f"refit ui: error: argument --port: {why}" in capsys.readouterr().err.splitlines()[-1]


def group_processes(pgid: int) -> set[tuple[int, int]]:
    """(pid, start time) of each process of a process group that has not exited (zombies count
    as exited). The start time tells a process from a later one given the same pid: pids wrap
    at 32768 here, and a long suite goes through many."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):  # gone while read
            continue
        state, group, started = fields[0], int(fields[2]), int(fields[19])
        if group == pgid and state != "Z":
            members.add((int(stat.parent.name), started))
    return members


def group_members(pgid: int) -> list[int]:
    """The pids of the processes of a process group that have not exited."""
    return sorted(pid for pid, _ in group_processes(pgid))


def servers_on(port: int) -> list[int]:
    """The live `prefect server start` processes serving on port."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prefect" in command and b"server" in command and str(port).encode() in command:
            found.append(int(cmdline.parent.name))
    return [pid for pid in found if group_members(pid)]


def start_ui(env: dict, port: int) -> tuple[subprocess.Popen, int]:
    """`refit ui --port` in the background, once it has recorded the server it started (before
    the server answers): the command and the server's pid (its process group's)."""
    state = Path(env["REFIT_HOME"]) / "ui" / "server.json"
    command = [sys.executable, "-m", "refit.flows.cli", "ui", "--port", str(port)]
    ui = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not state.is_file() or not state.read_text():
        assert ui.poll() is None and time.time() < deadline, ui.communicate()[0]
        time.sleep(0.05)
    assert not is_healthy(f"http://127.0.0.1:{port}"), "the server was recorded only once it answered"
    return ui, json.loads(state.read_text())["pid"]


def commands(pids: list[int]) -> list[str]:
    """The command lines, states and parents of these processes, for a failure's message."""
    lines = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            lines.append(f"{pid}: {command} (state {status['State']}, parent {status['PPid']})")
        except (OSError, ValueError, KeyError):
            lines.append(f"{pid}: gone")
    return lines


def wait_gone(pgid: int, seconds: float = 60) -> list[int]:
    """The pids of the group's processes of now that are still there after `seconds` (a process
    that later takes one of their pids, or joins the group, is not one of them)."""
    members = group_processes(pgid)
    deadline = time.time() + seconds
    while (left := members & group_processes(pgid)) and time.time() < deadline:
        time.sleep(0.2)
    return sorted(pid for pid, _ in left)


@pytest.mark.slow
def test_an_interrupted_start_stops_its_server_and_a_killed_one_is_left_to_stop(refit_env, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers = []
    try:
        ui, server = start_ui(refit_env, port)  # Ctrl-C while it waits for the server
        servers.append(server)
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=60)
        assert not (left := wait_gone(server)), commands(left)
        assert not (Path(refit_env["REFIT_HOME"]) / "ui" / "server.json").exists()
        assert refit(refit_env, "ui", "--stop").strip() == "no Refit UI server is running"

        ui, server = start_ui(refit_env, port)  # killed while it waits: the server stays, recorded
        servers.append(server)
        ui.kill()
        ui.wait()
        again = subprocess.run(
            [sys.executable, "-m", "refit.flows.cli", "ui", "--port", str(port)],
            env=refit_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (
            f"already running: the Prefect UI at {url}" in again.stdout
            or f"the server `refit ui` started at {url} (pid {server}) does not answer" in again.stderr
        ), again.stdout + again.stderr  # the one refit started, not a second one nor someone else's
        assert refit(refit_env, "ui", "--stop").startswith(f"stopped the Refit UI server at {url} (pid {server})")
        assert not (left := wait_gone(server)), commands(left)

        for key in ("REFIT_HOME", "PREFECT_HOME"):  # a start that times out, here
            monkeypatch.setenv(key, refit_env[key])
        with pytest.raises(UIError, match="the Prefect server did not start"):
            start_server(port, timeout=0)
        assert not servers_on(port) and not (Path(refit_env["REFIT_HOME"]) / "ui" / "server.json").exists()
    finally:  # what a failure left
        for server in {*servers, *servers_on(port)}:
            if group_members(server):
                os.killpg(server, signal.SIGKILL)
