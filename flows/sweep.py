"""`refit sweep`: the pilot sweep as a Prefect flow, one subflow per variant (stages/sweep.py).

The shared data stages run once; each variant's mix, train and evaluate run as cached
tasks in its own workdir, so rerunning a sweep only runs what changed. Variants run one
after another, or several at once when `sweep.devices` holds more than one group of
`train.num_processes` devices; a failed one is recorded with its error and the others go on.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from refit.flows.artifacts import artifact_key, inline_images
from refit.flows.continuation import continue_from
from refit.flows.pilot.variants import (
    SHARED_STAGES,
    SWEEP_DIR,
    SweepError,
    Variant,
    check_grid,
    choose_winner,
    device_slots,
    failed_row,
    plan_variants,
    prepare_variant,
    result_row,
    write_results,
)
from refit.flows.refresh import prepare_run, run_name, run_stage
from refit.stages.core.config import Recipe, RecipeError, load_recipe
from refit.stages.core.lock import workdir_lock
from refit.stages.core.progress import Progress

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
    if workdir_path.name == SWEEP_DIR:  # its variants and results would land in sweep/sweep/
        raise SweepError(
            f"workdir {workdir_path} is a sweep folder: give the run's workdir ({workdir_path.parent}); "
            f"the sweep writes into its {SWEEP_DIR}/"
        )
    fraction = budget_fraction or loaded.sweep.budget_fraction
    logger = get_run_logger()
    with workdir_lock(workdir_path, f"sweep of {loaded.name} (flow run {flow_run.name})"):
        loaded, why = continue_from(loaded, workdir_path)
        logger.info("%s", why)
        variants = plan_variants(loaded, check_grid(loaded, grid))
        for stage in SHARED_STAGES:
            run_stage(stage, loaded, workdir_path)
        slots = device_slots(loaded)
        done: dict[str, dict] = {}
        progress = Progress("sweep", len(variants), "variants", logger, every=0)
        progress.update(0)

        def run_slot(slot: int) -> None:  # variant n trains on slot n % slots: the same devices on a rerun
            for number in range(slot, len(variants), len(slots)):
                variant = variants[number]
                logger.info("variant %d/%d: %s (%s)", number + 1, len(variants), variant.name, variant.description)
                done[variant.name] = _run_variant(loaded, variant, workdir_path, fraction, slots[slot])
                progress.update(len(done), f"{variant.name} {done[variant.name]['status']}")

        with ThreadPoolExecutor(len(slots)) as pool:  # each thread keeps the flow's context: variants stay subflows
            for future in [pool.submit(contextvars.copy_context().run, run_slot, slot) for slot in range(len(slots))]:
                future.result()
        rows = [done[variant.name] for variant in variants]
        winner, reason = choose_winner(loaded, rows)
        summary = write_results(workdir_path / SWEEP_DIR, loaded, rows, winner, reason, fraction, workdir_path)
    logger.info("%s", f"winner: {reason}" if winner else f"no winner: {reason}")
    sweep_artifacts(loaded.name, workdir_path / SWEEP_DIR, rows)
    return summary


def _run_variant(recipe: Recipe, variant: Variant, workdir: Path, fraction: float, devices: list[int] | None) -> dict:
    """The variant's results row; a failed row, with the reason, if it is invalid or fails."""
    try:
        variant_recipe = prepare_variant(recipe, variant, workdir, fraction, devices)
    except RecipeError as error:
        return failed_row(variant, str(error))
    state = sweep_variant(str(Path(variant_recipe.workdir) / "recipe.yaml"), return_state=True)
    if not state.is_completed():  # failed, crashed or cancelled
        get_run_logger().warning("variant %s failed: %s", variant.name, state.message)
        return failed_row(variant, state.message or "failed")
    reports = state.result()
    row = result_row(variant_recipe, variant, reports["train"], reports["evaluate"], Path(variant_recipe.workdir))
    for warning in row["warnings"]:
        get_run_logger().warning("variant %s: %s", variant.name, warning)
    return row


def sweep_artifacts(name: str, sweep_dir: Path, rows: list[dict]) -> None:
    create_markdown_artifact(
        key=artifact_key("sweep", name),
        markdown=inline_images((sweep_dir / "results.md").read_text(), sweep_dir),
        description=f"pilot sweep of {name}",
    )
    table = [
        {
            "variant": r["variant"],
            "status": r["status"],
            "settings": r["description"],
            "score": r.get("score"),
            "gates": "" if r["status"] != "ok" else ", ".join(r["failed_gates"]) or "all pass",
            "device_hours": r.get("device_hours"),
            "error": r.get("error", ""),
        }
        for r in rows
    ]
    create_table_artifact(key=artifact_key("sweep-table", name), table=table, description=f"pilot sweep of {name}")
