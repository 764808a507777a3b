"""Data stages killed with SIGKILL midway: nothing half-written is ever visible, and a
rerun ends with byte-identical outputs to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LEGACY, NEW, REPO, make_recipe, write_jsonl

pytestmark = pytest.mark.slow


def refit(*args: str) -> subprocess.Popen:
    env = dict(os.environ, LOGURU_LEVEL="WARNING")
    return subprocess.Popen(
        [sys.executable, "-m", "refit.flows.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def data_files(folder: Path) -> dict[str, bytes]:
    """Outputs that must match byte for byte (timings and SQLite page layout excluded)."""
    keep = (".parquet", ".arrow", ".jsonl")
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.suffix in keep or p.name == "index.json"
    }


def kill_when(process: subprocess.Popen, ready, visible: Path, timeout: float = 120) -> None:
    """SIGKILL the process as soon as ready() holds; meanwhile the final output folder must
    never exist without its done marker."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()
        assert not visible.exists() or (visible / "_SUCCESS.json").exists()
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10  # its forked workers (datatrove's pool and manager, tokenize's pool) die with it
    while stage_processes(visible.parent) and time.time() < deadline:
        time.sleep(0.05)
    assert stage_processes(visible.parent) == [], "forked workers outlived the killed stage"


def stage_processes(workdir: Path) -> list[int]:
    """Live processes running a refit stage on workdir (the stage's forked workers share its command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            zombie = "State:\tZ" in (entry / "status").read_text()
        except (OSError, NotADirectoryError):
            continue
        if b"refit.flows.cli" in cmdline and str(workdir).encode() in cmdline and not zombie:
            found.append(int(entry.name))
    return found


@pytest.fixture
def recipe_path(tmp_path, tiny_tokenizer_dir):
    write_jsonl(tmp_path / "data" / "old.jsonl", [{"id": f"o{i}", "text": d["text"]} for i, d in enumerate(LEGACY)])
    write_jsonl(tmp_path / "data" / "new.jsonl", [{"id": f"n{i}", "text": d["text"]} for i, d in enumerate(NEW)])
    return make_recipe(
        tmp_path,
        [
            {"name": "old", "paths": ["data/old.jsonl"], "role": "legacy"},
            {"name": "new", "paths": ["data/new.jsonl"], "role": "new"},
        ],
        sections={"tokenizer": str(tiny_tokenizer_dir), "tokenize": {"seq_len": 32, "rows_per_shard": 8, "workers": 1}},
        workers=2,
    )


def test_killed_curate_and_tokenize_rerun_to_identical_outputs(tmp_path, recipe_path):
    for stage in ("curate", "tokenize"):
        assert refit("stage", stage, str(recipe_path), "--workdir", str(tmp_path / "clean")).wait() == 0
    expected = {stage: data_files(tmp_path / "clean" / stage) for stage in ("curate", "tokenize")}
    assert len(expected["tokenize"]) > 8  # several shards, so the kill lands between them

    killed = tmp_path / "killed"
    process = refit("stage", "curate", str(recipe_path), "--workdir", str(killed))
    kill_when(process, lambda: (killed / "curate.tmp" / "work" / "signatures").exists(), killed / "curate")
    assert not (killed / "curate").exists()
    assert refit("stage", "curate", str(recipe_path), "--workdir", str(killed)).wait() == 0
    assert data_files(killed / "curate") == expected["curate"]

    process = refit("stage", "tokenize", str(recipe_path), "--workdir", str(killed))
    kill_when(process, lambda: len(list((killed / "tokenize.tmp").rglob("shard-*.json"))) >= 3, killed / "tokenize")
    assert refit("stage", "tokenize", str(recipe_path), "--workdir", str(killed)).wait() == 0
    assert data_files(killed / "tokenize") == expected["tokenize"]
    assert not (killed / "tokenize.tmp").exists() and not (killed / "curate.tmp").exists()
