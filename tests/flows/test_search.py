"""TPE pilot search: the space from the recipe, trials as recipe variants, a pruned trial's
training really stops, and a search killed mid-trial resumes without rerunning finished trials:
the killed settings are proposed again, then new ones, and the results list each trial once."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, metrics, prepare, write_jsonl

from refit.flows.pilot.study import (
    ROW,
    CheckpointPruning,
    best_vs_compute,
    open_study,
    requeue_interrupted,
    space,
    trial_overrides,
    trial_rows,
    trial_variant,
    write_search_outputs,
)
from refit.flows.pilot.variants import SweepError, prepare_variant
from refit.stages.core.config import RecipeError, load_recipe
from refit.stages.core.lock import workdir_lock
from refit.stages.core.markers import read_marker
from refit.stages.train.stage import StopTraining, run_train

pytestmark = pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)


def _edit(path: Path, **sections) -> Path:
    spec = yaml.safe_load(path.read_text())
    spec.update(sections)
    path.write_text(yaml.safe_dump(spec))
    return path


def _searched(tmp_path: Path, tiny_model_dir: Path, search: dict) -> tuple[Path, Path]:
    """A recipe whose every trial passes the gates it is judged on, with this search space."""
    gates = {"min_average_gain": -1.0, "max_legacy_loss_increase": 10.0}
    path, workdir = prepare(tmp_path, tiny_model_dir, validation_fraction=0.3, run_data_stages=False, gates=gates)
    return _edit(path, sweep={"search": search}), workdir


def test_space_comes_from_the_recipe_and_qa_share_rescales_the_last_phase(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    with pytest.raises(SweepError, match="qa_share: the last phase needs QA"):
        space(load_recipe(path))  # the tiny recipe has no QA source
    write_jsonl(tmp_path / "data" / "qa.jsonl", [{"id": f"q{i}", "text": "Q: what? A: that. " * 5} for i in range(5)])
    spec = yaml.safe_load(path.read_text())
    spec["sources"].append({"name": "qa", "paths": ["data/qa.jsonl"], "role": "qa"})
    spec["mixture"]["phases"][1]["weights"] = {"old": 1, "new": 3, "qa": 1}
    spec["sweep"] = {"search": {"decay": ["cosine", "wsd"]}}
    recipe = load_recipe(_edit(path, **spec))
    dims = space(recipe)
    assert set(dims) == {
        "schedule.max_lr",
        "schedule.min_lr_ratio",
        "schedule.decay",
        "mixture.phases.1.lr_below",
        "qa_share",
    }
    assert dims["schedule.max_lr"].log and dims["schedule.max_lr"].low == pytest.approx(1e-3)  # 3e-3 / 3
    params = {"schedule.max_lr": 2e-3, "mixture.phases.1.lr_below": 0.3, "qa_share": 0.2}
    overrides = trial_overrides(recipe, params)
    assert overrides["mixture.phases.1.weights"] == pytest.approx({"old": 0.2, "new": 0.6, "qa": 0.2})
    variant = trial_variant(recipe, params)
    assert variant.name == trial_variant(recipe, dict(reversed(params.items()))).name  # same settings, same workdir
    made = prepare_variant(recipe, variant, workdir, 0.5)
    assert made.schedule.max_lr == 2e-3 and made.phases[1].lr_below == 0.3 and made.phases[1].weights["qa"] == 0.2
    bad = _edit(path, sweep={"search": {"lr_below": [0.5, 0.2], "max_lr": [0, 1e-3]}})
    with pytest.raises(RecipeError, match=r"sweep\.search\.lr_below.*need 0 < low < high") as error:
        load_recipe(bad)
    assert "sweep.search.max_lr" in str(error.value)
    spec["train"]["validation_tokens"] = 0  # nothing for the pruner to read
    with pytest.raises(SweepError, match="sweep.search.pruner: median prunes on the validation loss"):
        space(load_recipe(_edit(path, **spec)))
    spec["sweep"]["search"]["pruner"] = "none"
    assert "qa_share" in space(load_recipe(_edit(path, **spec)))


@pytest.mark.slow
def test_a_pruned_trial_stops_its_training_processes(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, steps=400, validation_fraction=0.3)
    recipe = load_recipe(path)
    # minus any real loss is below -0.01: pruned at the first checkpoint past the warmup, step 8
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(-0.01, n_warmup_steps=8))
    trial = study.ask()
    pruning = CheckpointPruning(trial, workdir / "train.tmp" / "metrics.jsonl")
    with pytest.raises(StopTraining, match="pruned at step 8: its validation loss"):
        run_train(recipe, workdir, on_progress=pruning)
    steps = len(metrics(workdir, "train.tmp"))
    assert trial.should_prune() and 8 <= steps < 400
    # what the pruner saw: minus the validation loss the training processes logged at each checkpoint
    logged = {m["step"] + 1: m["val_loss"] for m in metrics(workdir, "train.tmp") if "val_loss" in m}
    assert study.trials[0].intermediate_values == {4: -logged[4], 8: -logged[8]}
    time.sleep(3)
    assert len(metrics(workdir, "train.tmp")) == steps  # nothing trains on
    assert not (workdir / "train").exists()


def _study_states(sweep_dir: Path) -> list[str]:
    database = sweep_dir / "search.db"
    if not database.is_file():
        return []
    try:
        with sqlite3.connect(database) as db:
            return [state for (state,) in db.execute("select state from trials order by number")]
    except sqlite3.OperationalError:  # the tables are not made yet
        return []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_killed_search_resumes_and_does_not_rerun_finished_trials(prefect_harness, tmp_path, tiny_model_dir):
    from prefect.settings import PREFECT_API_URL

    from refit.flows.search import search

    path, workdir = _searched(tmp_path, tiny_model_dir, {"qa_share": None, "startup_trials": 2, "pruner": "median"})
    sweep_dir = workdir / "sweep"
    code = (
        "from refit.flows.search import search; "
        f"search(recipe={str(path)!r}, trials=3, budget_fraction=0.5, workdir={str(workdir)!r})"
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True)
    deadline = time.time() + 1200  # this machine may be shared and slow
    while not (
        (states := _study_states(sweep_dir))
        and states[0] == "COMPLETE"
        and states[-1] == "RUNNING"
        and list(sweep_dir.glob("tpe-*/train.tmp/metrics.jsonl"))  # the running trial is training
    ):
        assert time.time() < deadline and process.poll() is None, "no trial was running after a finished one"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # mid-training
    process.wait()
    killed = len(states) - 1
    first = sweep_dir / trial_dir_of(sweep_dir, 0)
    first_trained = read_marker(first / "train")["finished"]
    with workdir_lock(workdir, "test: wait for the killed run's trainer", wait=True):
        pass

    summary = search(recipe=str(path), trials=3, budget_fraction=0.5, workdir=str(workdir))
    after = _study_states(sweep_dir)
    assert after[:killed] == states[:killed] and after[killed] == "FAIL" and len(after) == 4
    assert trial_dir_of(sweep_dir, killed + 1) == trial_dir_of(sweep_dir, killed)  # proposed again, same workdir
    assert read_marker(first / "train")["finished"] == first_trained  # the finished trial was not retrained
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'search.db'}")
    logged = {m["step"] + 1: -m["val_loss"] for m in metrics(first) if "val_loss" in m}
    assert study.trials[0].intermediate_values == logged and list(logged) == [4, 8, 10]  # its checkpoints
    rows = {r["variant"]: r for r in summary["rows"]}
    assert {"baseline-legacy-only", "baseline-no-switch"} <= set(rows) and len(rows) == 5
    assert summary["winner"] and "pass every required gate" in summary["reason"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in done] == [0, killed + 1, killed + 2]
    assert done[2].params != done[1].params  # after the one proposed again, new settings: not a replay of the draws
    variants = [trial_variant(load_recipe(path), t.params).name for t in done]
    results = (sweep_dir / "results.md").read_text().splitlines()
    assert [line.split(" ")[1] for line in results if line.startswith("| tpe-")] == variants  # each trial once
    trials_table = [line.split(" | ")[:3] for line in results if re.match(r"\| \d+ \|", line)]
    assert trials_table == [[f"| {t.number}", "complete", v] for t, v in zip(done, variants)]
    assert sum("(winner)" in line for line in results) == 1
    best = Path(summary["best_recipe"])
    assert best.read_text().startswith("# Chosen by `refit sweep`") and load_recipe(best).schedule.total_tokens == 2560
    for png in ("best_vs_compute.png", "slice.png", "accuracy_vs_compute.png"):
        assert (sweep_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert "importances" in summary["plots"] and "## TPE trials" in (sweep_dir / "results.md").read_text()


def test_a_trial_killed_after_its_row_was_kept_is_listed_once(tmp_path, tiny_model_dir):
    path, _ = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    recipe = load_recipe(_edit(path, sweep={"search": {"qa_share": None}}))
    dims, sweep_dir = space(recipe), tmp_path / "sweep"
    row = {"variant": "tpe-0", "description": "its settings", "device_seconds": 1.0}
    study = open_study(recipe, sweep_dir)
    study.ask(dims).set_user_attr(ROW, row)  # killed before the study was told the outcome
    study = open_study(recipe, sweep_dir)  # the rerun's
    requeue_interrupted(study, dims)
    rerun = study.ask(dims)
    rerun.set_user_attr(ROW, row)
    study.tell(rerun, 0.5)
    assert trial_rows(study) == [row] and [point["trial"] for point in best_vs_compute(study)] == [1]
    write_search_outputs(study, [], sweep_dir)
    assert [line for line in (sweep_dir / "results.md").read_text().splitlines() if "tpe-0" in line] == [
        "| 1 | complete | tpe-0 | its settings | 50.0 | 1 |"
    ]


def trial_dir_of(sweep_dir: Path, number: int) -> str:
    """The variant folder a trial ran in, from its results row or its parameters."""
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'search.db'}")
    trial = study.trials[number]
    recipe = load_recipe(sweep_dir.parent.parent / "recipe.yaml")
    return trial_variant(recipe, trial.params).name


def test_the_command_line_is_checked_before_anything_runs(tmp_path, tiny_model_dir, capsys):
    from refit.flows.cli import main

    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    assert main(["sweep", str(path), "--search", "tpe"]) == 2
    assert main(["sweep", str(path), "--grid", "schedule.max_lr=1e-3", "--trials", "3"]) == 2
    assert main(["sweep", str(path), "--search", "tpe", "--trials", "3"]) == 2  # no QA source for qa_share
    assert "qa_share" in capsys.readouterr().err and not workdir.exists()
