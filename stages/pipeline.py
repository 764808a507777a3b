"""The seven stages in pipeline order: flows, the CLI, the sweep and the tests find them here.

Stage modules never import this registry, so a stage's code version (its import graph, see
`code_version.project_modules`) covers only the stages it reads from.
"""

from __future__ import annotations

from refit.stages.audit import stage as audit
from refit.stages.core.contract import Stage, StageOptions
from refit.stages.curate import stage as curate
from refit.stages.evaluate import stage as evaluate
from refit.stages.mix import stage as mix
from refit.stages.publish import stage as publish
from refit.stages.tokenize import stage as tokenize
from refit.stages.train import stage as train

PIPELINE: tuple[Stage, ...] = tuple(module.STAGE for module in (curate, tokenize, mix, train, evaluate, audit, publish))
STAGES: dict[str, Stage] = {stage.name: stage for stage in PIPELINE}
NAMES: tuple[str, ...] = tuple(STAGES)


def downstream(names: list[str] | tuple[str, ...]) -> list[str]:
    """The named stages and every stage that reads their output, directly or not, in pipeline order."""
    affected = set(names)
    for stage in PIPELINE:
        if affected.intersection(read.name for read in stage.reads):
            affected.add(stage.name)
    return [stage.name for stage in PIPELINE if stage.name in affected]


def depending_on(paths: set[str]) -> list[str]:
    """The stages whose output depends on any of these recipe sections or fields (dotted paths),
    directly or through the stages they read, in pipeline order."""

    def overlap(a: str, b: str) -> bool:  # one is the other or lies within it
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    return downstream([s.name for s in PIPELINE if any(overlap(p, r) for p in paths for r in s.recipe_reads)])


__all__ = ["NAMES", "PIPELINE", "STAGES", "Stage", "StageOptions", "depending_on", "downstream"]
