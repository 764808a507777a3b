"""What a reviewer sees in the Prefect UI: the audit report, the gates, training progress,
the published version. Keyed artifacts get a new version each night under the same key."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from refit.stages.audit import stage as audit
from refit.stages.core.config import Recipe
from refit.stages.mix import stage as mix
from refit.stages.publish import stage as publish


def artifact_key(kind: str, name: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{name}".lower()).strip("-")


def inline_images(markdown: str, folder: Path) -> str:
    """The report's PNGs as data URIs: the UI cannot reach files in the workdir."""

    def inline(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, markdown)


def audit_artifacts(name: str, workdir: Path) -> None:
    """The audit report (Markdown with its plots) and the gates (table), passed or failed."""
    if not audit.has_report(workdir):
        return
    report = audit.read_report(workdir)
    verdict = "PASSED" if report["passed"] else f"FAILED ({len(report['failed'])} gates)"
    create_markdown_artifact(
        key=artifact_key("audit", name),
        markdown=inline_images(audit.report_markdown(workdir).read_text(), audit.STAGE.output(workdir)),
        description=f"audit of {name}: {verdict}",
    )
    rows = [
        {
            "gate": g["name"],
            "result": "pass" if g["passed"] else "FAIL",
            "value": g["value"],
            "threshold": g["threshold"],
            "reason": g["reason"],
        }
        for g in report["gates"]
    ]
    create_table_artifact(key=artifact_key("gates", name), table=rows, description=f"audit gates of {name}: {verdict}")


def published_artifact(name: str, report: dict) -> None:
    path = report["path"]
    link = path if "://" in path else Path(path).resolve().as_uri()
    create_link_artifact(
        key=artifact_key("published", name),
        link=link,
        link_text=f"{name} {report['version']}",
        description="already published, unchanged" if report["already_published"] else "newly published",
    )


def _audit_shown(recipe: Recipe, workdir: Path, report: dict | None) -> None:
    audit_artifacts(recipe.name, workdir)  # also when it failed: report is None then


def _publish_shown(recipe: Recipe, workdir: Path, report: dict) -> None:
    published_artifact(recipe.model_name, report)


# the stages whose outcome a reviewer reads in the UI, and how it is shown
_SHOWN = {audit.STAGE.name: _audit_shown, publish.STAGE.name: _publish_shown}


def show_in_ui(stage: str, recipe: Recipe, workdir: Path, report: dict | None) -> None:
    """The artifacts of a stage's outcome, for the stages that have one (audit, publish)."""
    if shown := _SHOWN.get(stage):
        shown(recipe, workdir, report)


class TrainingProgress:
    """Called by the train stage with each new metrics line: a progress artifact, made on the
    first line, so a stage with nothing to do leaves none. (The stage logs progress lines.) With
    anneal ingredients the progress runs over every step trained: the whole run once (ingredient
    0), then the last phase again per further ingredient (a line's `ingredient`)."""

    def __init__(self, recipe: Recipe, workdir: Path):
        self.name, self.workdir, self.ingredients = recipe.name, workdir, recipe.soup.ingredients
        self.artifact = None

    def __call__(self, line: dict) -> None:
        if self.artifact is None:
            manifest = mix.read_manifest(self.workdir)
            self.anneal_steps = manifest.phases[-1].steps if self.ingredients > 1 else 0
            self.total_steps = manifest.total_steps + (self.ingredients - 1) * self.anneal_steps
            self.artifact = create_progress_artifact(
                progress=0.0,
                key=artifact_key("training", self.name),
                description=f"training {self.name}: {self.total_steps} steps",
            )
        ingredient = line.get("ingredient", 0)
        done = line["step"] + 1 + ingredient * self.anneal_steps  # ingredient i >= 1 follows the others
        of_which = f", ingredient {ingredient} of {self.ingredients}" if self.ingredients > 1 else ""
        update_progress_artifact(
            self.artifact,
            progress=100.0 * done / self.total_steps,
            description=f"step {done}/{self.total_steps}{of_which}, loss {line['loss']:.3f}, "
            f"LR {line['lr']:.2e}, phase {line['phase']}",
        )
