"""`refit ui`: a Prefect server that stays, runs recorded into it, and the audit artifact's page
in a real browser (headless Chromium from Debian's `chromium` package). It saves its
screenshot as `docs/audit-artifact.png` (not tracked; the README shows the demo's)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import LENIENT, REPO, free_port, prepare

from refit.flows.refresh import STAGE_FLOWS
from refit.flows.ui import browse
from refit.stages.lib.config import load_recipe

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)]
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
