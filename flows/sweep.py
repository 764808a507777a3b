"""`refit sweep`: the pilot sweep as a Prefect flow, one subflow per variant (stages/sweep.py).

The shared data stages run once; each variant's mix, train and evaluate run as cached
tasks in its own workdir, so rerunning a sweep only runs what changed. Variants run one
after another; a failed one is recorded with its error and the others go on.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from flows.artifacts import artifact_key, inline_images
from flows.refresh import prepare_run, run_name, run_stage
from stages.config import RecipeError, load_recipe
from stages.continuation import continue_from
from stages.lock import workdir_lock
from stages.sweep import (SHARED_STAGES, choose_winner, failed_row, parse_grid, plan_variants, prepare_variant, result_row,
                          write_results)

VARIANT_STAGES = ("mix", "train", "evaluate")


@flow(name="refit-sweep-variant", flow_run_name=lambda: f"variant-{Path(flow_run.parameters['recipe']).parent.name}")
def sweep_variant(recipe: str) -> dict:
    """Mix, train and evaluate one variant in its own workdir (its recipe's)."""
    loaded = load_recipe(recipe)
    reports = {stage: run_stage(stage, loaded, Path(loaded.workdir))[0] for stage in VARIANT_STAGES}
    return {"train": reports["train"], "evaluate": reports["evaluate"]}


@flow(name="refit-sweep", flow_run_name=run_name("sweep"), log_prints=True)
def sweep(recipe: str, grid: list[str], budget_fraction: float | None = None, workdir: str | None = None) -> dict:
    """Every combination of the grid plus two baselines, at budget_fraction of the recipe's
    tokens (default: the recipe's sweep.budget_fraction); writes `<workdir>/sweep/`."""
    loaded, workdir_path = prepare_run(recipe, workdir)
    fraction = budget_fraction or loaded.sweep.budget_fraction
    logger = get_run_logger()
    with workdir_lock(workdir_path, f"sweep of {loaded.name} (flow run {flow_run.name})"):
        loaded, why = continue_from(loaded, workdir_path)
        logger.info("%s", why)
        variants = plan_variants(loaded, parse_grid(grid))
        for stage in SHARED_STAGES:
            run_stage(stage, loaded, workdir_path)
        rows = []
        for number, variant in enumerate(variants, start=1):
            logger.info("variant %d/%d: %s (%s)", number, len(variants), variant.name, variant.description)
            try:
                variant_recipe = prepare_variant(loaded, variant, workdir_path, fraction)
            except RecipeError as error:
                rows.append(failed_row(variant, str(error)))
                continue
            state = sweep_variant(str(Path(variant_recipe.workdir) / "recipe.yaml"), return_state=True)
            if not state.is_completed():  # failed, crashed or cancelled
                rows.append(failed_row(variant, state.message or "failed"))
                logger.warning("variant %s failed: %s", variant.name, state.message)
                continue
            reports = state.result()
            rows.append(result_row(variant_recipe, variant, reports["train"], reports["evaluate"]))
        winner, reason = choose_winner(loaded, rows)
        summary = write_results(workdir_path / "sweep", loaded, rows, winner, reason, fraction)
    logger.info("%s", f"winner: {reason}" if winner else f"no winner: {reason}")
    sweep_artifacts(loaded.name, workdir_path / "sweep", rows)
    return summary


def sweep_artifacts(name: str, sweep_dir: Path, rows: list[dict]) -> None:
    create_markdown_artifact(key=artifact_key("sweep", name),
                             markdown=inline_images((sweep_dir / "results.md").read_text(), sweep_dir),
                             description=f"pilot sweep of {name}")
    table = [{"variant": r["variant"], "status": r["status"], "settings": r["description"],
              "average_acc": r.get("average_acc"), "device_hours": r.get("device_hours"), "error": r.get("error", "")}
             for r in rows]
    create_table_artifact(key=artifact_key("sweep-table", name), table=table, description=f"pilot sweep of {name}")
