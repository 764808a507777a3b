"""A whole run killed at random moments (its process group, SIGKILL), then rerun, ends exactly
where an uninterrupted run ends, and no process of the killed run is left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LENIENT, REPO, prepare

from refit.stages.pipeline import NAMES

pytestmark = pytest.mark.slow
EVERY_STAGE = (
    "import sys\nfrom refit.flows.cli import main\n"
    f"for stage in {list(NAMES)!r}:\n"
    "    if main(['stage', stage, sys.argv[1], '--workdir', sys.argv[2]]):\n        sys.exit(1)\n"
)


def start(path: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", EVERY_STAGE, str(path), str(workdir)],
        cwd=REPO,
        start_new_session=True,  # its own process group, as a scheduler's job would have
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def processes_of(workdir: Path) -> list[str]:
    """Live processes whose command line names the workdir: the run, its workers, its trainers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                zombie = "State:\tZ" in (entry / "status").read_text()
            except OSError:
                continue
            if str(workdir) in cmdline and not zombie:
                found.append(cmdline)
    return found


def published(registry: Path) -> tuple[list[str], str, dict[str, str]]:
    """Versions, `latest`, and the sha256 of every model file of the latest version."""
    versions = sorted(p.name for p in registry.iterdir() if p.name.startswith("v"))
    latest = (registry / "latest").read_text().strip()
    sums = dict(reversed(line.split("  ", 1)) for line in (registry / latest / "SHA256SUMS").read_text().splitlines())
    model = {
        name: digest for name, digest in sums.items() if "/" not in name and name.endswith((".safetensors", ".json"))
    }
    return versions, latest, {k: v for k, v in model.items() if k not in ("refit_publish.json", "eval_report.json")}


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_run_killed_at_random_moments_ends_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    reference_path, reference = prepare(
        tmp_path / "ref", tiny_model_dir, validation_fraction=0.3, gates=LENIENT, run_data_stages=False
    )
    assert start(reference_path, reference).wait(timeout=900) == 0
    expected = published(tmp_path / "ref" / "registry" / "tiny")

    path, workdir = prepare(
        tmp_path / "run", tiny_model_dir, validation_fraction=0.3, gates=LENIENT, run_data_stages=False
    )
    moments = random.Random(20241129)
    for _ in range(3):
        process = start(path, workdir)
        time.sleep(moments.uniform(1.0, 30.0))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.time() + 30
        while processes_of(workdir) and time.time() < deadline:
            time.sleep(0.5)
        assert processes_of(workdir) == [], "processes of the killed run are still alive"
    assert start(path, workdir).wait(timeout=900) == 0
    assert published(tmp_path / "run" / "registry" / "tiny") == expected
    assert not [p for p in workdir.iterdir() if p.name.endswith((".tmp", ".old"))]  # nothing half-done left
