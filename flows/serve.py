"""`refit serve`: the nightly refresh and one manual-rerun deployment per stage, served from
one process (`prefect.serve`). For a team setup with work pools, see deployments/prefect.yaml."""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.schedules import Cron

from refit.flows.refresh import STAGE_FLOWS, refresh
from refit.stages.core.config import load_recipe

NIGHTLY = "0 2 * * *"


def deployments(recipe_path: Path, cron: str = NIGHTLY, timezone: str = "UTC") -> list:
    """The RunnerDeployments: `<name>-nightly` on the cron schedule, `<name>-<stage>` on demand."""
    recipe = load_recipe(recipe_path)  # a broken recipe fails here, not at 2 a.m.
    parameters = {"recipe": str(Path(recipe_path).resolve())}
    nightly = refresh.to_deployment(
        name=f"{recipe.name}-nightly",
        schedules=[Cron(cron, timezone=timezone)],
        parameters={**parameters, "wait": True},
        tags=["refit", recipe.name],
        description=f"Nightly continued-pretraining refresh of {recipe.model_name}",
    )
    reruns = [
        stage_flow.to_deployment(
            name=f"{recipe.name}-{stage}",
            parameters={**parameters, "force": True},
            tags=["refit", recipe.name],
            description=f"Rerun the {stage} stage by hand",
        )
        for stage, stage_flow in STAGE_FLOWS.items()
    ]
    return [nightly, *reruns]


def serve_recipe(recipe_path: Path, cron: str = NIGHTLY, timezone: str = "UTC") -> None:
    serve(*deployments(recipe_path, cron, timezone))
