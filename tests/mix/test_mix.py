"""mix: the manifest, typed and versioned, with the closed-form switch step of each schedule."""

from __future__ import annotations

import json

import pytest
from conftest import rewrite_output

from refit.flows.cli import main as refit
from refit.stages.core.markers import StageNotReady
from refit.stages.core.schedule import schedule_for
from refit.stages.mix.manifest import ManifestMismatch
from refit.stages.mix.stage import manifest_path, read_manifest, run_mix
from refit.stages.tokenize.stage import run_tokenize


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd"])
def test_manifest_switch_step_is_the_schedules(tmp_path, curated, decay):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    recipe = recipe.model_copy(
        update={"schedule": recipe.schedule.model_copy(update={"decay": decay, "warmup_fraction": 0.1})}
    )
    manifest = run_mix(recipe, workdir)
    schedule = schedule_for(recipe)
    threshold = recipe.phases[1].lr_below * schedule.max_lr
    expected = next(s for s in range(schedule.warmup_steps, schedule.total_steps) if schedule.lr(s) <= threshold)
    general, qa = manifest.phases
    assert qa.start_step == expected == general.steps
    assert general.steps + qa.steps == manifest.total_steps == schedule.total_steps
    for name, source in manifest.sources.items():
        assert source.rows == json.loads((workdir / "tokenize" / name / "index.json").read_text())["rows"]
        assert source.epochs == pytest.approx(source.drawn_sequences / source.rows, rel=0.01)


def test_manifest_warns_about_repeats_and_empty_sources(curated, tmp_path):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    greedy = recipe.model_copy(update={"schedule": recipe.schedule.model_copy(update={"total_tokens": 3_000_000})})
    warnings = run_mix(greedy, workdir).warnings
    assert any("source old is drawn" in w and "mixture.max_epochs 4" in w for w in warnings)
    rewrite_output(
        workdir / "tokenize",
        "new/index.json",
        json.dumps(
            {
                **json.loads((workdir / "tokenize" / "new" / "index.json").read_text()),
                "rows": 0,
                "tokens": 0,
                "shards": [],
            }
        ),
    )
    assert any("source new has weight but no tokens" in w for w in run_mix(recipe, workdir, force=True).warnings)


def test_a_manifest_of_another_version_is_refused_with_what_to_rerun(curated):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    manifest = run_mix(recipe, workdir)
    assert read_manifest(workdir) == manifest  # what is written is what is read
    older = {**json.loads(manifest_path(workdir).read_text()), "version": 1, "recipe": "t"}  # version 1 named it
    rewrite_output(workdir / "mix", "manifest.json", json.dumps(older))
    with pytest.raises(ManifestMismatch, match=r"manifest version 1, this Refit reads version 2: rerun mix"):
        read_manifest(workdir)
    without_phases = {k: v for k, v in older.items() if k not in ("phases", "recipe")} | {"version": 2}
    rewrite_output(workdir / "mix", "manifest.json", json.dumps(without_phases))
    with pytest.raises(ManifestMismatch, match=r"not a valid manifest \(1 problems\): rerun mix"):
        read_manifest(workdir)


def test_stages_refuse_to_run_out_of_order(tmp_path, curated):
    recipe, workdir, _ = curated
    with pytest.raises(StageNotReady, match="run `refit stage tokenize` first"):
        run_mix(recipe, workdir)


def test_refit_plan_prints_the_table(curated, capsys):
    recipe, workdir, path = curated
    assert refit(["plan", str(path), "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((workdir / "mix" / "manifest.json").read_text())
    switch = manifest["phases"][1]["start_step"]
    assert f"switch to qa at step {switch} of {manifest['total_steps']}" in out
    assert "epochs" in out and "old" in out and "general" in out
