"""Which model a refresh continues from, and which published version it must beat.

A nightly refresh continues from the latest version published under the recipe's model
name, unless `base_model.pin` is set or nothing is published yet. When no source file has
changed since that version was published (same data version: the listing of every input
file), there is nothing new to learn: the run keeps that version's own base, so an
unchanged rerun reproduces the same fingerprints and every stage is cached instead of
training the same data twice (a changed recipe or Refit version retrains from that base).

The version to beat is the newest published one not made by this very training run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from refit.stages.core.config import Recipe
from refit.stages.core.contract import StageOptions
from refit.stages.curate import stage as curate
from refit.stages.pipeline import STAGES
from refit.stages.publish.stage import Registry, local_checkpoint, published_records, read_published
from refit.stages.train import stage as train

log = logging.getLogger(__name__)


def with_base(recipe: Recipe, path: str | Path) -> Recipe:
    """The recipe continuing from another checkpoint; every resolved schedule value is kept."""
    return recipe.model_copy(update={"base_model": recipe.base_model.model_copy(update={"path": str(path)})})


def continue_from(recipe: Recipe, workdir: Path) -> tuple[Recipe, str]:
    """The recipe to run tonight and a sentence saying why its base was chosen."""
    if recipe.base_model.pin:
        return recipe, f"base pinned by the recipe: {recipe.base_model.path}"
    records = published_records(recipe)
    if not records:
        return recipe, f"nothing published as {recipe.model_name} yet: continuing from {recipe.base_model.path}"
    latest = records[0]
    cache = Path(workdir) / "bases"
    if latest.get("data_version") == curate.data_version(recipe):
        base = recorded_base(recipe, latest, cache)
        if base is None:  # the caller logs the reason
            return (
                recipe,
                f"no new data since {latest['version']}, but its record names a base that is neither a complete "
                f"version of this registry nor the recipe's base ({latest.get('base_model')!r}, version "
                f"{latest.get('base_version')!r}): not trusted, continuing from {recipe.base_model.path}",
            )
        return (
            with_base(recipe, base),
            f"no new data since {latest['version']} was published: continuing from its base "
            f"{latest['base_model']} again, so unchanged stages are cached",
        )
    base = local_checkpoint(latest, cache)
    return with_base(recipe, base), f"continuing from the latest published version {latest['version']} ({base})"


def recorded_base(recipe: Recipe, record: dict, cache: Path) -> str | Path | None:
    """The base a published record names, if it can be trusted: a complete version of this same
    registry under its own URL (a local copy of it), or the recipe's own base path. None for
    anything else a writer of the registry could plant (another folder, a `../` version)."""
    base, version = record.get("base_model"), record.get("base_version")
    if version is None:
        return base if base == recipe.base_model.path else None
    registry = Registry(recipe)
    if version in registry.versions() and base == registry.url_of(version):
        return local_checkpoint({"path": base, "version": version}, cache)
    return None


def previous_evaluation(recipe: Recipe, train_fingerprint: str) -> tuple[str | None, dict | None]:
    """The newest published version not produced by this training run, and its eval report."""
    for record in published_records(recipe):
        if record.get("train_fingerprint") != train_fingerprint:
            return record["version"], json.loads(read_published(recipe, record["path"], "eval_report.json"))
    return None, None


def stage_options(
    stage: str, recipe: Recipe, workdir: Path, eval_backend: str = "refit", force: bool = False
) -> StageOptions:
    """A stage's inputs that are not in the recipe, the same for a flow run and `refit stage`:
    the evaluation backend, and for the stage that takes it (audit) the eval report of the
    version to beat."""
    previous = None
    trained = train.run_fingerprint(workdir)
    if "previous_eval" in STAGES[stage].takes and trained is not None:  # else the stage says what is missing
        version, previous = previous_evaluation(recipe, trained)
        if version:
            log.info("audit: comparing against the previous published version %s too", version)
    return StageOptions(force=force, backend=eval_backend, previous_eval=previous)
