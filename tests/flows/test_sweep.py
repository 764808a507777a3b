"""Pilot sweep: grid parsing and variant recipes are checked before anything runs; a small
grid on tiny data runs end to end beside both baselines, a failing variant is reported
without stopping the others, and the winner's recipe validates."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, prepare

from refit.flows.pilot.variants import SweepError, check_grid, parse_grid, plan_variants, prepare_variant, set_field
from refit.stages.core.config import RecipeError, load_recipe

pytestmark = pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)


def test_grid_values_are_typed_and_bad_keys_are_refused(tiny_model_dir):
    assert parse_grid(
        ["schedule.max_lr=3e-3,1e-3", "mixture.phases.1.lr_below=0.5,0.2", "schedule.decay=cosine,wsd"]
    ) == {"schedule.max_lr": [3e-3, 1e-3], "mixture.phases.1.lr_below": [0.5, 0.2], "schedule.decay": ["cosine", "wsd"]}
    with pytest.raises(SweepError, match="share the curated and tokenized data"):
        parse_grid(["tokenize.seq_len=64,128"])
    with pytest.raises(SweepError, match="KEY=V1,V2"):
        parse_grid(["schedule.max_lr"])
    with pytest.raises(SweepError, match="no field 'lr_belw'"):
        set_field({"mixture": {"phases": [{}, {"lr_below": 0.2}]}}, "mixture.phases.1.lr_belw", 0.5)


def test_a_list_index_and_a_key_that_read_alike_are_not_confused(tiny_model_dir):
    data = {"mixture": {"phases": [{"name": "general", "weights": {"0": 1.0, "new": 1.0}}]}}  # a source named 0
    set_field(data, "mixture.phases.0.weights.0", 3.0)
    assert data == {"mixture": {"phases": [{"name": "general", "weights": {"0": 3.0, "new": 1.0}}]}}


def test_a_typo_in_a_grid_key_stops_the_sweep_before_anything_runs(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    with pytest.raises(SweepError, match=r"--grid train\.micro_batch_sise: the recipe has no field 'micro_batch_sise'"):
        check_grid(load_recipe(path), ["schedule.max_lr=3e-3,1e-3", "train.micro_batch_sise=1,2"])
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    command = ["sweep", str(path), "--workdir", str(workdir), "--grid", "train.micro_batch_sise=1,2"]
    result = subprocess.run(
        [sys.executable, "-m", "refit.flows.cli", *command], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "micro_batch_sise" in result.stderr and "Traceback" not in result.stderr
    assert "temporary server" not in result.stderr and not (workdir / "curate").exists()


def test_variants_are_complete_recipes_validated_with_the_field_named(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    recipe = load_recipe(path)
    variants = plan_variants(recipe, parse_grid(["mixture.phases.1.lr_below=0.2,1.5"]))
    assert [v.name for v in variants] == ["lr_below0.2", "lr_below1.5", "baseline-legacy-only", "baseline-no-switch"]
    ok = prepare_variant(recipe, variants[0], workdir, 0.5)
    assert ok.schedule.total_tokens == recipe.schedule.total_tokens // 2 and ok.mixture.phases[1].lr_below == 0.2
    assert (workdir / "sweep" / "lr_below0.2" / "curate").resolve() == (workdir / "curate").resolve()
    with pytest.raises(RecipeError, match=r"mixture\.phases\[1\]\.lr_below"):
        prepare_variant(recipe, variants[1], workdir, 0.5)
    legacy = prepare_variant(recipe, variants[2], workdir, 0.5)
    assert [(p.name, p.weights) for p in legacy.mixture.phases] == [("legacy-only", {"old": 1.0})]
    assert [p.name for p in prepare_variant(recipe, variants[3], workdir, 0.5).mixture.phases] == ["general"]


def test_the_number_of_soup_ingredients_is_a_grid_knob_and_the_baselines_stay_single_runs(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    recipe = load_recipe(path)
    variants = plan_variants(recipe, check_grid(recipe, ["soup.ingredients=1,3"]))
    assert [v.name for v in variants] == ["ingredients1", "ingredients3", "baseline-legacy-only", "baseline-no-switch"]
    souped = prepare_variant(recipe, variants[1], workdir, 0.5)
    assert souped.soup.ingredients == 3 and souped.schedule.total_tokens == recipe.schedule.total_tokens // 2
    assert prepare_variant(recipe, variants[0], workdir, 0.5).soup.ingredients == 1
    # a recipe that soups: its baselines have one phase, nothing to soup, so they run once
    souping = recipe.model_copy(update={"soup": souped.soup})
    for baseline in plan_variants(souping, {})[-2:]:
        assert prepare_variant(souping, baseline, workdir, 1.0).soup.ingredients == 1, baseline.name


@pytest.mark.slow
def test_sweep_runs_grid_and_baselines_reports_the_failure_and_writes_the_winner(
    prefect_harness, tmp_path, tiny_model_dir
):
    from refit.flows.sweep import sweep

    path, workdir = prepare(
        tmp_path, tiny_model_dir, validation_fraction=0.3, run_data_stages=False, gates={"min_average_gain": -1.0}
    )
    spec = yaml.safe_load(path.read_text())
    spec["sweep"] = {"devices": 2}  # two variants at a time, one device (here: CPU process) each
    path.write_text(yaml.safe_dump(spec))
    summary = sweep(recipe=str(path), grid=["schedule.max_lr=3e-3,1e30"], budget_fraction=0.5, workdir=str(workdir))
    rows = {r["variant"]: r for r in summary["rows"]}
    assert set(rows) == {"max_lr0.003", "max_lr1e30", "baseline-legacy-only", "baseline-no-switch"}
    assert rows["max_lr1e30"]["status"] == "failed" and "non-finite loss" in rows["max_lr1e30"]["error"]
    for name in ("max_lr0.003", "baseline-legacy-only", "baseline-no-switch"):
        assert rows[name]["status"] == "ok" and rows[name]["tokens"] == 10 * 4 * 32  # half of 20 steps
    assert rows["baseline-no-switch"]["switches"] == [] and rows["max_lr0.003"]["switches"]
    assert summary["winner"] == "max_lr0.003" and "pass every required gate" in summary["reason"]
    best = load_recipe(summary["best_recipe"])  # a complete recipe for the full run
    assert best.schedule.max_lr == 3e-3 and best.schedule.total_tokens == load_recipe(path).schedule.total_tokens
    assert yaml.safe_load(open(summary["best_recipe"]))["workdir"] == str(workdir.resolve())  # the sweep's
    assert rows["max_lr0.003"]["gates"]["contamination"] and rows["max_lr0.003"]["gates"]["training_health"]
    markdown = (workdir / "sweep" / "results.md").read_text()
    assert "FAILED" in markdown and "**(winner)**" in markdown and "baseline-legacy-only" in markdown
    assert (workdir / "sweep" / "accuracy_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((workdir / "sweep" / "results.json").read_text())["winner"] == "max_lr0.003"
    devices = {name: load_recipe(workdir / "sweep" / name / "recipe.yaml").train.devices for name in rows}
    assert devices == {"max_lr0.003": [0], "max_lr1e30": [1], "baseline-legacy-only": [0], "baseline-no-switch": [1]}
    # each variant from its recipe being written to its last file: a variant still running
    # when another starts ran at the same time (serially, the next recipe comes after the last file)
    windows = [variant_window(workdir / "sweep" / name) for name in rows]
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(windows, 2))  # concurrent


def variant_window(variant_dir: Path) -> tuple[float, float]:
    """When the sweep wrote the variant's recipe, and when the variant last wrote a file."""
    last = max(p.stat().st_mtime for p in variant_dir.rglob("*") if p.is_file())
    return (variant_dir / "recipe.yaml").stat().st_mtime, last


def _row(name, acc, forgetting_ok=True, kind="grid", gain_ok=True):
    return {
        "variant": name,
        "kind": kind,
        "status": "ok",
        "description": name,
        "score": acc,
        "score_stderr": 0.013,
        "score_gain": acc - 0.3,
        "average_by_metric": {"acc": acc - 0.01, "acc_norm": acc},
        "benchmarks": {"b": {"metric": "acc_norm", "acc": acc - 0.01, "acc_norm": acc}},
        "legacy_loss": {"old": 5.0},
        "new_loss": {"new": 4.0},
        "tokens": 1280,
        "train_seconds": 10.0,
        "eval_seconds": 1.0,
        "device_hours": 0.01,
        "gates": {"forgetting:old": forgetting_ok, "benchmark_regression:b": True, "average_accuracy_gain": gain_ok},
    }


def test_the_winner_passes_the_required_gates_and_a_lead_within_noise_is_said(tmp_path, tiny_model_dir):
    from refit.flows.pilot.variants import choose_winner

    path, _ = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    recipe = load_recipe(path)
    winner, reason = choose_winner(
        recipe,
        [
            _row("a", 0.328),
            _row("b", 0.327),
            _row("c", 0.40, forgetting_ok=False),
            _row("d", 0.45, gain_ok=False),  # by default every gate counts, the gain gate too
            _row("legacy", 0.305, kind="baseline"),
        ],
    )
    assert winner["variant"] == "a" and "2 of 4 grid variants that pass every required gate" in reason
    assert "lead over b (0.1 points) is within noise" in reason
    winner, reason = choose_winner(recipe, [_row("a", 0.40), _row("b", 0.30)])
    assert winner["variant"] == "a" and "within noise" not in reason
    narrowed = recipe.model_copy(update={"sweep": recipe.sweep.model_copy(update={"must_pass": ["forgetting"]})})
    assert choose_winner(narrowed, [_row("d", 0.45, gain_ok=False)])[0]["variant"] == "d"  # narrowed explicitly


def test_a_sweep_where_no_variant_passes_says_so_and_writes_no_best_recipe(tmp_path, tiny_model_dir):
    from refit.flows.pilot.variants import choose_winner, write_results

    path, workdir = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    recipe = load_recipe(path)
    sweep_dir = workdir / "sweep"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / f"{recipe.name}.best.yaml").write_text("# an earlier sweep's winner\n")
    rows = [_row("a", 0.40, forgetting_ok=False), _row("b", 0.45, gain_ok=False)]
    rows[0]["warnings"] = ["source old is drawn 6.8 times (more than mixture.max_epochs 4)"]
    why = "items-weighted average accuracy ...; its standard error comes mostly from b (65 items, 80% of the variance)"
    rows[1]["failed_gates"] = {"average_accuracy_gain": why}  # as result_row keeps each failed gate's reason
    winner, reason = choose_winner(recipe, rows)
    assert winner is None and reason.startswith("no grid variant passed every required gate")
    assert "a failed forgetting:old" in reason and "b failed average_accuracy_gain" in reason
    summary = write_results(sweep_dir, recipe, rows, winner, reason, 0.25, workdir)
    assert summary["winner"] is None and summary["best_recipe"] is None
    assert not (sweep_dir / f"{recipe.name}.best.yaml").exists()  # the earlier winner is not left to mislead
    markdown = (sweep_dir / "results.md").read_text()
    assert markdown.startswith("# Pilot sweep at 25% of the token budget (1,280 tokens per variant)")
    assert "**No winner:** no grid variant passed" in markdown
    assert "FAIL: **forgetting:old**" in markdown and "FAIL: **average_accuracy_gain**" in markdown
    assert "| b (acc_norm) |" in markdown and "avg acc_norm" in markdown
    assert "- a: source old is drawn 6.8 times" in markdown  # the mix's warnings travel with the results
    assert f"Why gates failed:\n\n- b: average_accuracy_gain: {why}" in markdown
