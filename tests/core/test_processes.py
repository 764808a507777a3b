"""No process outlives the run: the lifeline's parent-death signal, the temporary Prefect server
of a killed `refit run`, a busy workdir refused before any server starts, and no fork hook
installed by importing the stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, hold_lock, prepare

SLEEPER = ("timeit", "-n", "1", "-s", "import time", "time.sleep(600)")  # a module run that sleeps


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def wait_dead(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_process_under_the_lifeline_dies_when_its_parent_is_killed():
    code = (
        "import subprocess, sys, time; from refit.stages.core import lifeline\n"
        f"child = subprocess.Popen(lifeline.command(*{SLEEPER!r}))\n"
        "print(child.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child is running its module by now
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert wait_dead(child)


def test_a_process_whose_parent_already_changed_dies_at_once():
    """The parent died before the parent-death signal was asked for: the pid check catches it."""
    code = "from refit.stages.core.lifeline import die_with_parent; die_with_parent(1); print('still alive')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL and "still alive" not in result.stdout


def test_importing_the_stages_installs_no_fork_hook_and_the_block_resets_sigterm():
    code = (
        "import os, signal, sys\n"
        "def handler(*args): pass\n"
        "signal.signal(signal.SIGTERM, handler)\n"
        "import refit.stages, refit.stages.curate.stage, refit.stages.tokenize.stage, refit.stages.train.stage\n"
        "from refit.stages.core.lifeline import forked_workers_follow_parent\n"
        "def child_handler():\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(0 if signal.getsignal(signal.SIGTERM) is handler else 1)\n"
        "    return 'inherited' if os.waitpid(pid, 0)[1] == 0 else 'default'\n"
        "outside = child_handler()\n"
        "with forked_workers_follow_parent():\n"
        "    inside = child_handler()\n"
        "print(outside, inside, child_handler())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["inherited", "default", "inherited"]


def refit_env() -> dict:
    """The environment of a `refit` command that starts its own temporary Prefect server."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_busy_workdir_is_refused_before_any_server_starts(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    holder = hold_lock(workdir)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "refit.flows.cli", "run", str(path), "--workdir", str(workdir)],
            cwd=REPO,
            env=refit_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line, no traceback, no server log
    assert result.stderr.startswith(f"error: {workdir.resolve()} is in use by refit run demo (pid {holder.pid} ")
    assert "temporary server" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """The temporary servers' own database, created by the first of them."""
    return tmp_path_factory.mktemp("prefect-home")


def server_of(refit: subprocess.Popen, deadline: float) -> int:
    """The pid of the temporary Prefect server (uvicorn) that `refit` started."""
    while time.time() < deadline:
        assert refit.poll() is None, "refit exited before its server started"
        for pid in children(refit.pid):
            try:
                if "uvicorn" in Path(f"/proc/{pid}/cmdline").read_text():
                    return pid
            except FileNotFoundError:
                continue
        time.sleep(0.1)
    raise AssertionError("no temporary server started")


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
@pytest.mark.parametrize(
    "kill", ["SIGKILL to refit alone", "SIGKILL to its process group", "SIGTERM to its process group"]
)
def test_a_killed_refit_run_leaves_no_temporary_server(tmp_path, tiny_model_dir, prefect_home, kill):
    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    env = dict(refit_env(), PREFECT_HOME=str(prefect_home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="150")
    refit = subprocess.Popen(
        [sys.executable, "-m", "refit.flows.cli", "run", str(path), "--workdir", str(workdir)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        server = server_of(refit, deadline)
        lock = workdir / ".refit.lock"
        while not (lock.is_file() and lock.read_text()):  # the server answered: the flow runs and holds the workdir
            assert refit.poll() is None and time.time() < deadline
            time.sleep(0.1)
        if kill == "SIGKILL to refit alone":
            refit.send_signal(signal.SIGKILL)
        else:
            os.killpg(refit.pid, signal.SIGKILL if kill.startswith("SIGKILL") else signal.SIGTERM)
        refit.wait(timeout=60)
        assert wait_dead(server, 30), f"the temporary server (pid {server}) outlived refit"
    finally:
        if refit.poll() is None:
            os.killpg(refit.pid, signal.SIGKILL)
            refit.wait()


def descendants(pid: int) -> list[int]:
    try:
        direct = children(pid)
    except FileNotFoundError:
        return []
    return direct + [d for child in direct for d in descendants(child)]


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_scoring_workers_die_with_a_killed_evaluate(tmp_path, tiny_model_dir):
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, 'tests')\n"
        "from conftest import scoring_tasks\n"
        "from refit.stages.evaluate.scorer import ScoringSettings, score_models\n"
        "model = Path(sys.argv[1])\n"
        "score_models({'base': model}, model, scoring_tasks(), ScoringSettings('cpu', 'float32', 4, num_processes=2))"
    )
    evaluate = subprocess.Popen([sys.executable, "-c", code, str(tiny_model_dir)], cwd=REPO)
    deadline = time.time() + 120
    while len(workers := descendants(evaluate.pid)) < 3:  # torchrun and its two workers
        assert evaluate.poll() is None and time.time() < deadline
        time.sleep(0.05)
    evaluate.send_signal(signal.SIGKILL)
    evaluate.wait()
    try:
        assert all(wait_dead(pid) for pid in workers), "scoring processes outlived the killed stage"
    finally:
        for pid in filter(alive, workers):
            os.kill(pid, signal.SIGKILL)
