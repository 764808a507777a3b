"""`refit sweep --search tpe --trials N`: a Bayesian pilot search as a Prefect flow (flows/pilot/study.py).

The shared data stages and the grid's two baselines run as in `refit sweep`; then each
trial is a variant of the recipe, proposed by Optuna's TPE sampler, mixed, trained and
evaluated in its own workdir under `<workdir>/sweep/`. The train task reports the loss at
each checkpoint to the trial and stops the training processes when the pruner says so.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from refit.flows.artifacts import TrainingProgress, artifact_key
from refit.flows.continuation import continue_from
from refit.flows.pilot.study import (
    ROW,
    CheckpointPruning,
    open_study,
    requeue_interrupted,
    space,
    trial_rows,
    trial_variant,
    trials_done,
    write_search_outputs,
)
from refit.flows.pilot.variants import (
    SHARED_STAGES,
    SWEEP_DIR,
    choose_winner,
    failed_row,
    plan_variants,
    prepare_variant,
    result_row,
)
from refit.flows.pilot.variants import write_results as write_sweep_results
from refit.flows.refresh import prepare_run, run_name, run_stage
from refit.flows.sweep import _run_variant, sweep_artifacts
from refit.stages.core.config import Recipe, RecipeError
from refit.stages.core.lock import workdir_lock
from refit.stages.pipeline import STAGES, StageOptions
from refit.stages.train.stage import StopTraining


@task(task_run_name="train", cache_policy=NONE)
def train_trial(recipe: Recipe, workdir: str, pruning: CheckpointPruning) -> dict:
    """Train one trial, reporting to its pruner; {"pruned": reason} when it stopped it."""
    progress = TrainingProgress(recipe, Path(workdir))

    def on_progress(line: dict) -> None:
        progress(line)
        pruning(line)

    try:
        return STAGES["train"].run(recipe, Path(workdir), StageOptions(on_progress=on_progress))
    except StopTraining as stop:
        return {"pruned": str(stop)}


def _run_trial(recipe: Recipe, study, distributions, workdir: Path, fraction: float) -> None:
    """Ask the study for a trial, run it and tell the study its outcome, with its results row."""
    from optuna.trial import TrialState

    logger = get_run_logger()
    trial = study.ask(distributions)
    variant = trial_variant(recipe, trial.params)
    logger.info("trial %d: %s (%s)", trial.number, variant.name, variant.description)
    started = time.time()
    try:
        variant_recipe = prepare_variant(recipe, variant, workdir, fraction)
    except RecipeError as error:
        trial.set_user_attr(ROW, failed_row(variant, str(error)))
        study.tell(trial, state=TrialState.FAIL)
        return
    variant_dir = Path(variant_recipe.workdir)
    pruning = CheckpointPruning(trial, variant_dir / "train.tmp" / "metrics.jsonl")
    try:
        run_stage("mix", variant_recipe, variant_dir)
        trained = train_trial(variant_recipe, str(variant_dir), pruning)
        if "pruned" not in trained:
            evaluation, _ = run_stage("evaluate", variant_recipe, variant_dir)
    except Exception as error:  # a failed trial is recorded with its reason; the search goes on
        logger.warning("trial %d failed: %s", trial.number, error)
        row = failed_row(variant, f"{type(error).__name__}: {error}")
        trial.set_user_attr(ROW, {**row, "device_seconds": time.time() - started})
        study.tell(trial, state=TrialState.FAIL)
        return
    if "pruned" in trained:
        logger.info("trial %d: %s", trial.number, trained["pruned"])
        row = {**failed_row(variant, trained["pruned"]), "status": "pruned"}
        trial.set_user_attr(
            ROW, {**row, "device_seconds": (time.time() - started) * variant_recipe.train.num_processes}
        )
        study.tell(trial, state=TrialState.PRUNED)
        return
    row = result_row(variant_recipe, variant, trained, evaluation, variant_dir)
    trial.set_user_attr(ROW, {**row, "device_seconds": row["device_hours"] * 3600})
    if row["score"] is None:
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, row["score"])
    logger.info(
        "trial %d: weighted average accuracy %.1f (best %.1f)", trial.number, 100 * row["score"], 100 * study.best_value
    )


@flow(name="refit-search", flow_run_name=run_name("search"), log_prints=True)
def search(recipe: str, trials: int, budget_fraction: float | None = None, workdir: str | None = None) -> dict:
    """The grid's baselines, then TPE trials until `trials` have run to an outcome (a killed
    search resumes: finished trials are kept, interrupted ones proposed again); writes
    `<workdir>/sweep/`."""
    loaded, workdir_path = prepare_run(recipe, workdir)
    fraction = budget_fraction or loaded.sweep.budget_fraction
    logger = get_run_logger()
    sweep_dir = workdir_path / SWEEP_DIR
    with workdir_lock(workdir_path, f"search of {loaded.name} (flow run {flow_run.name})"):
        loaded, why = continue_from(loaded, workdir_path)
        logger.info("%s", why)
        distributions = space(loaded)
        for stage in SHARED_STAGES:
            run_stage(stage, loaded, workdir_path)
        baselines = [
            _run_variant(loaded, variant, workdir_path, fraction, None)
            for variant in plan_variants(loaded, {})
            if variant.kind == "baseline"
        ]
        study = open_study(loaded, sweep_dir)
        if interrupted := requeue_interrupted(study, distributions):
            logger.info("resuming the study: trial(s) %s were interrupted and run again", interrupted)
        while trials_done(study) < trials:
            _run_trial(loaded, study, distributions, workdir_path, fraction)
        rows = [*trial_rows(study), *baselines]
        winner, reason = choose_winner(loaded, rows)
        summary = write_sweep_results(sweep_dir, loaded, rows, winner, reason, fraction, workdir_path)
        plots = write_search_outputs(study, baselines, sweep_dir)
    logger.info("%s", f"winner: {reason}" if winner else f"no winner: {reason}")
    sweep_artifacts(loaded.name, sweep_dir, rows)  # results.md, with the trials table and the plots, and the rows
    create_table_artifact(
        key=artifact_key("search-trials", loaded.name),
        table=[{"trial": t.number, "state": t.state.name, **t.params, "value": t.value} for t in study.trials],
        description=f"TPE trials of {loaded.name}",
    )
    return {**summary, "plots": plots, "trials": len(study.trials)}
