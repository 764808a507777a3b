"""Prefect flows: `refresh` runs every stage in order; each stage is also a flow of its own.

Each stage runs as a task whose cache key is the stage's input fingerprint (its recipe
sections, the fingerprints of the stages it reads and the code version), with results
persisted in `<workdir>/.prefect-results/`, so an unchanged rerun is all cache hits. The
cache is never trusted over the disk: a stage whose output does not match its fingerprint
(deleted, or made by hand) runs, and the stage itself then decides from its done marker
whether there is work to do. `force` reruns the named stages and every stage that reads
their output. One run at a time per workdir (stages/core/lock.py). Stages come from
`refit.stages.pipeline`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from refit.flows.artifacts import TrainingProgress, show_in_ui
from refit.flows.continuation import continue_from, stage_options
from refit.stages.audit.stage import AuditFailed
from refit.stages.core.config import Recipe, load_recipe
from refit.stages.core.lock import workdir_lock
from refit.stages.pipeline import NAMES, STAGES, StageOptions, downstream

RESULTS_DIR = ".prefect-results"


class StageFingerprint(CachePolicy):
    """Cache key: the stage name and its input fingerprint, computed by the flow."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return f"{inputs['stage']}-{inputs['fingerprint']}"


def _transient(task_, task_run, state) -> bool:
    """Retry I/O errors (a flaky network filesystem or object store); never a stage's verdict,
    nor a path that is missing or forbidden (a configuration error: retrying only delays it)."""
    permanent = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    return isinstance(state.data, OSError) and not isinstance(state.data, permanent)


@task(
    task_run_name="{stage}",
    cache_policy=StageFingerprint(),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_transient,
)
def stage_task(stage: str, recipe: Recipe, workdir: str, fingerprint: str, options: StageOptions) -> dict:
    """A stage's run; it returns and persists the report's summary: paths and small figures, never data."""
    # a stage that reports progress (train) shows it in the UI
    options = dataclasses.replace(options, on_progress=TrainingProgress(recipe, Path(workdir)))
    return STAGES[stage].summary(STAGES[stage].run(recipe, Path(workdir), options))


def run_stage(stage: str, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> tuple[dict, str]:
    """Run one stage as a cached task (see the module docstring); its report and final state
    name ("Completed", or "Cached" when the cache answered)."""
    described = STAGES[stage]
    expected = described.input_fingerprint(recipe, workdir, options)
    fresh = described.is_done(recipe, workdir, options)
    configured = stage_task.with_options(refresh_cache=options.force or not fresh, result_storage=workdir / RESULTS_DIR)
    state = configured(stage, recipe, str(workdir), expected, options, return_state=True)
    return state.result(), state.name


def _recipe_name(recipe: str) -> str:
    try:
        return str(yaml.safe_load(Path(recipe).read_text()).get("name") or Path(recipe).stem)
    except (OSError, yaml.YAMLError, AttributeError):
        return Path(recipe).stem


def run_name(kind: str):
    def name() -> str:
        return f"{_recipe_name(flow_run.parameters['recipe'])}-{kind}-{dt.datetime.now():%Y-%m-%d-%H%M%S}"

    return name


def prepare_run(recipe_path: str, workdir: str | None) -> tuple[Recipe, Path]:
    recipe = load_recipe(recipe_path)
    return recipe, Path(workdir or recipe.workdir).resolve()


def _stage_with_artifacts(
    stage: str, recipe: Recipe, workdir: Path, force: bool, eval_backend: str
) -> tuple[dict, str]:
    try:
        report, state = run_stage(stage, recipe, workdir, stage_options(stage, recipe, workdir, eval_backend, force))
    except AuditFailed:
        show_in_ui(stage, recipe, workdir, None)  # the reviewer reads why in the UI
        raise
    show_in_ui(stage, recipe, workdir, report)
    return report, state


@flow(name="refit-refresh", flow_run_name=run_name("refresh"), log_prints=True)
def refresh(
    recipe: str,
    workdir: str | None = None,
    force: list[str] | None = None,
    wait: bool = False,
    eval_backend: str = "refit",
) -> dict:
    """Curate, tokenize, mix, train, evaluate, audit and publish: the nightly refresh.

    recipe: path of the recipe YAML. workdir: default the recipe's. force: stages to rerun
    even if cached (every stage reading their output reruns too). wait: queue behind a run
    holding the workdir instead of stopping. eval_backend: "refit" or "lm-eval"."""
    unknown = sorted(set(force or ()) - set(NAMES))
    if unknown:
        raise ValueError(f"force: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(NAMES)}")
    loaded, workdir_path = prepare_run(recipe, workdir)
    forced = set(downstream(force or []))
    logger = get_run_logger()
    with workdir_lock(workdir_path, f"refresh of {loaded.name} (flow run {flow_run.name})", wait=wait):
        loaded, why = continue_from(loaded, workdir_path)
        logger.info("%s", why)
        reports, states = {}, {}
        for stage in NAMES:
            reports[stage], states[stage] = _stage_with_artifacts(
                stage, loaded, workdir_path, stage in forced, eval_backend
            )
    published = reports["publish"]
    logger.info(
        "published %s %s at %s%s",
        loaded.model_name,
        published["version"],
        published["path"],
        " (already there)" if published["already_published"] else "",
    )
    return {
        "recipe": loaded.name,
        "workdir": str(workdir_path),
        "base_model": str(loaded.base_model.path),
        "continuation": why,
        "stages": states,
        "published": published,
        "audit": reports["audit"],
        "train": reports["train"],
    }


def _single_stage_flow(stage: str):
    def single_stage(
        recipe: str, workdir: str | None = None, force: bool = False, wait: bool = False, eval_backend: str = "refit"
    ) -> dict:
        loaded, workdir_path = prepare_run(recipe, workdir)
        with workdir_lock(workdir_path, f"{stage} of {loaded.name} (flow run {flow_run.name})", wait=wait):
            loaded, why = continue_from(loaded, workdir_path)
            get_run_logger().info("%s", why)
            report, state = _stage_with_artifacts(stage, loaded, workdir_path, force, eval_backend)
            return {"stage": stage, "state": state, "report": report}

    # named as the module attribute it is bound to, so a deployment's entrypoint resolves
    single_stage.__name__ = single_stage.__qualname__ = f"{stage}_flow"
    single_stage.__doc__ = f"Run the {stage} stage alone (it needs the stages before it done)."
    return flow(name=f"refit-{stage}", flow_run_name=run_name(stage), log_prints=True)(single_stage)


STAGE_FLOWS = {name: _single_stage_flow(name) for name in NAMES}
# module attributes, so that deployments name them as entrypoints (flows/refresh.py:train_flow)
curate_flow, tokenize_flow, mix_flow, train_flow, evaluate_flow, audit_flow, publish_flow = STAGE_FLOWS.values()
