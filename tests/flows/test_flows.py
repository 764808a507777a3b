"""The refresh flow on Prefect's test server: a full run on tiny data, an unchanged rerun all
cached, forced stages rerun with their successors only, a failing gate fails the flow with
its reasons in the UI, one run at a time per workdir, nightly continuation from the
latest published version, cancellation stops training, `refit serve` registers the
schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import LENIENT, NEW, REPO, prepare, training_processes, wait_exited, write_jsonl

from refit.stages.audit.stage import AuditFailed
from refit.stages.core.lock import LOCK_FILE, WorkdirBusy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True),
    pytest.mark.usefixtures("prefect_harness"),
]


def refresh(path: Path, workdir: Path, **kwargs) -> dict:
    from refit.flows.refresh import refresh as refresh_flow

    return refresh_flow(recipe=str(path), workdir=str(workdir), **kwargs)


def artifact(key: str, flow_run_id=None):
    """The artifact's versions, newest first; with flow_run_id, only those that flow run made."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    by_run = ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=by_run)
        )
    return sorted(found, key=lambda a: a.created, reverse=True)


def flow_runs(flow_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return sorted(runs, key=lambda r: r.created, reverse=True)


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory, tiny_model_dir):
    """One full refresh from raw data, shared by the tests that build on it: (recipe path,
    workdir, the flow's result, its flow run id). The tests run in any order, alone or
    together: each takes the state it starts from (the latest version, the curated batch)
    from the workdir and the registry, not from what the others did before it."""
    tmp = tmp_path_factory.mktemp("flow")
    path, workdir = prepare(tmp, tiny_model_dir, validation_fraction=0.3, gates=LENIENT, run_data_stages=False)
    spec = yaml.safe_load(path.read_text())
    spec["sources"][1]["paths"] = ["data/new*.jsonl"]  # files added later join the source
    path.write_text(yaml.safe_dump(spec))
    state = refresh(path, workdir, return_state=True)
    return path, workdir, state.result(), state.state_details.flow_run_id


def latest(path: Path) -> str:
    """The version the registry's `latest` names now."""
    return (path.parent / "registry" / "tiny" / "latest").read_text().strip()


def test_full_refresh_runs_every_stage_and_shows_the_audit_in_the_ui(refreshed):
    path, workdir, result, run_id = refreshed
    assert result["stages"] == dict.fromkeys(
        ["curate", "tokenize", "mix", "train", "evaluate", "audit", "publish"], "Completed"
    )
    assert (
        result["published"]["version"] == "v0001"
        and (path.parent / "registry" / "tiny" / "v0001" / "SHA256SUMS").is_file()
    )
    assert result["audit"]["passed"]
    (markdown,) = artifact("audit-t", run_id)  # what this flow run showed, whatever ran since
    assert markdown.type == "markdown" and "# Audit" in markdown.data and "PASSED" in markdown.data
    assert "data:image/png;base64," in markdown.data  # the plots travel with the report
    (gates,) = artifact("gates-t", run_id)
    assert gates.type == "table" and "forgetting:old" in json.dumps(gates.data)
    (training,) = artifact("training-t", run_id)
    assert training.type == "progress" and float(training.data) == 100.0
    (published,) = artifact("published-tiny", run_id)
    assert published.type == "markdown" and "v0001" in published.data
    names = [run.name for run in flow_runs("refit-refresh")]
    assert any(name.startswith(f"t-refresh-{time.strftime('%Y-%m-%d')}") for name in names)


def test_report_prints_the_verdict_and_where_to_read_more(refreshed, capsys):
    from refit.flows.cli import main as refit

    path, workdir, _, _ = refreshed
    assert refit(["report", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "audit of t: PASSED" in out and "pass  forgetting:old" in out and f"published: {latest(path)}" in out
    assert f"full report: {workdir / 'audit' / 'report.md'}" in out


def test_unchanged_rerun_is_all_cached_and_touches_nothing(refreshed):
    path, workdir, _, _ = refreshed
    registry = path.parent / "registry" / "tiny"

    def stage_outputs() -> list[Path]:  # not the lock's holder record nor Prefect's results: the stages'
        return sorted(p for p in workdir.rglob("*") if p.is_file() and not p.relative_to(workdir).parts[0][0] == ".")

    outputs, published, versions = stage_outputs(), latest(path), sorted(p.name for p in registry.iterdir())
    before = {p: p.stat().st_mtime_ns for p in outputs}
    again = refresh(path, workdir)
    assert set(again["stages"].values()) == {"Cached"}
    assert again["published"]["version"] == published
    assert (
        stage_outputs() == outputs and {p: p.stat().st_mtime_ns for p in outputs} == before
    )  # no stage wrote anything
    assert sorted(p.name for p in registry.iterdir()) == versions


def test_forced_stage_reruns_with_its_successors_only(refreshed):
    path, workdir, _, _ = refreshed
    published = latest(path)
    audit_before = (workdir / "audit" / "_SUCCESS.json").stat().st_mtime_ns
    result = refresh(path, workdir, force=["evaluate"])
    assert result["stages"] == {
        "curate": "Cached",
        "tokenize": "Cached",
        "mix": "Cached",
        "train": "Cached",
        "evaluate": "Completed",
        "audit": "Completed",
        "publish": "Completed",
    }
    assert (workdir / "audit" / "_SUCCESS.json").stat().st_mtime_ns > audit_before
    assert result["published"] == {**result["published"], "version": published, "already_published": True}


def test_second_run_on_a_busy_workdir_stops_or_waits_and_nothing_is_corrupted(refreshed):
    path, workdir, _, _ = refreshed
    published = latest(path)
    outcome = {}
    first = threading.Thread(target=lambda: outcome.setdefault("first", refresh(path, workdir, force=["train"])))
    first.start()
    deadline = time.time() + 60
    while not (workdir / LOCK_FILE).read_text() and time.time() < deadline:
        time.sleep(0.2)
    with pytest.raises(WorkdirBusy, match="in use by refresh of t"):
        refresh(path, workdir)
    waiting = threading.Thread(target=lambda: outcome.setdefault("waited", refresh(path, workdir, wait=True)))
    waiting.start()
    first.join(timeout=300)
    waiting.join(timeout=300)
    assert outcome["first"]["stages"]["train"] == "Completed"
    assert outcome["first"]["published"]["version"] == published  # retrained bitwise the same: nothing new
    assert set(outcome["waited"]["stages"].values()) == {"Cached"}  # ran after the first, not beside it


def test_nightly_continues_from_the_latest_version_with_new_files_only_curated(refreshed):
    path, workdir, _, _ = refreshed
    registry, previous = path.parent / "registry" / "tiny", latest(path)
    batch = json.loads((workdir / "curate" / "report.json").read_text())["batch"]
    write_jsonl(
        path.parent / "data" / "new2.jsonl", [{"id": f"m{i}", "text": d["text"]} for i, d in enumerate(NEW[20:30])]
    )
    result = refresh(path, workdir)
    assert result["base_model"] == str(registry / previous)
    assert f"latest published version {previous}" in result["continuation"]
    curate = json.loads((workdir / "curate" / "report.json").read_text())
    assert (
        curate["incremental"]
        and curate["batch"] == batch + 1
        and curate["sources"]["new"]["files"] == [str(path.parent / "data" / "new2.jsonl")]
    )
    audit = json.loads((workdir / "audit" / "report.json").read_text())
    assert "above_previous_version" in {g["name"] for g in audit["gates"]}
    following = f"v{int(previous[1:]) + 1:04d}"
    assert result["published"]["version"] == following and latest(path) == following
    assert set(refresh(path, workdir)["stages"].values()) == {"Cached"}  # the next night, nothing new


def test_a_pinned_base_is_kept_whatever_was_published(refreshed):
    from refit.flows.continuation import continue_from
    from refit.stages.core.config import load_recipe

    path, workdir, _, _ = refreshed
    recipe = load_recipe(path)
    assert (path.parent / "registry" / "tiny" / "v0001").is_dir()  # there is a version to continue from
    pinned = recipe.model_copy(update={"base_model": recipe.base_model.model_copy(update={"pin": True})})
    chosen, why = continue_from(pinned, workdir)
    assert chosen.base_model.path == recipe.base_model.path and why.startswith("base pinned by the recipe")
    _, unpinned_why = continue_from(recipe, workdir)
    assert "v0001" in unpinned_why and not unpinned_why.startswith("base pinned")  # unpinned: the published one


def test_transient_io_errors_are_retried_and_a_stages_verdict_is_not(refreshed, monkeypatch):
    from prefect import flow

    import refit.stages.mix.stage
    from refit.flows.refresh import run_stage
    from refit.stages.core.config import load_recipe
    from refit.stages.pipeline import StageOptions

    path, workdir, _, _ = refreshed
    real, calls = refit.stages.mix.stage.build_manifest, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("network filesystem hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(refit.stages.mix.stage, "build_manifest", flaky)

    @flow(name="rerun-mix")
    def rerun():
        return run_stage("mix", load_recipe(path), workdir, StageOptions(force=True))

    report, state = rerun()
    assert len(calls) == 2 and state == "Completed" and report["total_steps"] == 20

    def wrong(*args, **kwargs):
        calls.append(1)
        raise ValueError("a weight on an empty source")

    calls.clear()
    monkeypatch.setattr(refit.stages.mix.stage, "build_manifest", wrong)
    with pytest.raises(ValueError, match="empty source"):
        rerun()
    assert len(calls) == 1


def test_failing_gate_fails_the_flow_with_its_reasons_in_the_ui(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, validation_fraction=0.3, gates={"min_average_gain": 0.5})
    with pytest.raises(AuditFailed, match="average_accuracy_gain|average accuracy"):
        refresh(path, workdir)
    markdown = artifact("audit-t")[0].data
    assert "FAILED" in markdown and "| average_accuracy_gain | **no** |" in markdown
    assert not (tmp_path / "registry").exists()
    assert flow_runs("refit-refresh")[0].state.is_failed()
    # from the command line: the verdict, then its links in the UI, exit code 1, and Prefect's log of the
    # failure without a traceback
    # (stdout redirected by hand: a capture fixture's stream, closed after the test, would stay in Prefect's
    # console handler if the run set it up)
    import contextlib
    import io
    import logging

    from refit.flows.cli import main as refit

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert refit(["run", str(path), "--workdir", str(workdir)]) == 1
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
    out = printed.getvalue()
    assert "audit of t: FAILED" in out and f"full report: {workdir / 'audit' / 'report.md'}" in out
    verdict_then_links = out[out.index("full report:") :].splitlines()[1:]  # then where it is in the UI
    assert verdict_then_links[0] == "in the Prefect UI:" and verdict_then_links[-1].lstrip().startswith("audit:")
    failures = [r for r in records if "Encountered exception" in r.getMessage()]
    assert failures and all(r.exc_info is None for r in failures) and "Traceback" not in out


def test_cancelling_the_flow_stops_the_training_processes(tmp_path, tiny_model_dir):
    from prefect.settings import PREFECT_API_URL

    path, workdir = prepare(tmp_path, tiny_model_dir, steps=5000)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    process = subprocess.Popen(
        [sys.executable, "-m", "refit.flows.cli", "run", str(path), "--workdir", str(workdir)], cwd=REPO, env=env
    )
    deadline = time.time() + 120
    while not (workdir / "train.tmp" / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.5)
    assert training_processes(workdir), "training did not start"
    process.send_signal(signal.SIGTERM)  # what a Prefect runner sends a cancelled flow run
    assert process.wait(timeout=60) != 0
    assert wait_exited(training_processes(workdir), 30) == []
    assert not training_processes(workdir)
    assert not (workdir / "train" / "_SUCCESS.json").exists()


def test_a_truncated_shard_is_rebuilt_by_a_run_and_the_published_model_is_the_same(refreshed):
    """Integrity: a damaged output is not trusted as cached: the stage that wrote it runs again
    (and, its report being new, the stages after it), and the model comes out the same."""
    path, workdir, _, _ = refreshed
    shard = sorted((workdir / "tokenize").rglob("shard-*.arrow"))[0]
    original, published = shard.read_bytes(), latest(path)
    shard.write_bytes(original[: len(original) // 2])
    result = refresh(path, workdir)
    assert result["stages"]["curate"] == "Cached" and result["stages"]["tokenize"] == "Completed"
    assert shard.read_bytes() == original
    assert result["published"]["version"] == published and result["published"]["already_published"]


def test_a_shard_changed_in_place_stops_training_in_one_line_naming_it(refreshed, capsys):
    from refit.flows.cli import main as refit

    path, workdir, _, _ = refreshed
    shard = sorted((workdir / "tokenize").rglob("shard-*.arrow"))[0]
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size: only the content hash can tell
    try:
        assert refit(["stage", "train", str(path), "--workdir", str(workdir), "--force"]) == 1
    finally:
        shard.write_bytes(original)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"{shard.parent} is damaged: {shard.name} has sha256" in line and "--force tokenize" in line
    assert not (workdir / "train.tmp").exists()  # refused before anything was staged


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_run_repairs_latest_when_publish_is_cached(refreshed, damage):
    path, workdir, _, _ = refreshed
    pointer = path.parent / "registry" / "tiny" / "latest"
    newest = latest(path)
    pointer.unlink() if damage == "deleted" else pointer.write_bytes(b"\xff\xfe v9999 \x00\n")
    result = refresh(path, workdir)
    assert result["stages"]["publish"] == "Completed" and result["published"]["already_published"]
    assert {s for name, s in result["stages"].items() if name != "publish"} == {"Cached"}
    assert pointer.read_text() == f"{newest}\n"


def test_training_progress_runs_over_every_ingredients_steps_once(tmp_path, tiny_model_dir):
    """With 3 anneal ingredients the progress artifact covers the whole run, then the last phase
    twice more: it never goes back when an ingredient starts, and ends at 100%."""
    from refit.flows.artifacts import TrainingProgress
    from refit.stages.core.config import load_recipe
    from refit.stages.mix.stage import read_manifest

    path, workdir = prepare(tmp_path, tiny_model_dir)
    spec = yaml.safe_load(path.read_text())
    spec["name"] = "progress-of-a-soup"
    path.write_text(yaml.safe_dump({**spec, "soup": {"ingredients": 3}}))
    manifest = read_manifest(workdir)
    branch, total = manifest.phases[-1].start_step, manifest.total_steps
    progress = TrainingProgress(load_recipe(path), workdir)
    seen = []
    for ingredient in range(3):
        for step in range(0 if ingredient == 0 else branch, total):
            progress({"step": step, "loss": 1.0, "lr": 1e-3, "phase": "late", "ingredient": ingredient})
            (latest,) = artifact("training-progress-of-a-soup")
            seen.append(float(latest.data))
    assert seen == sorted(seen) and seen[-1] == 100.0
    assert len(seen) == progress.total_steps == total + 2 * (total - branch)
    assert latest.description.startswith(f"step {progress.total_steps}/{progress.total_steps}, ingredient 2 of 3")
