"""The contract every stage keeps: one `Stage` description, one way to call it.

Each stage module ends with its `STAGE`; `refit.stages.pipeline` lists them in pipeline
order, and flows, the CLI, fingerprints and the sweep find stages there, never by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from refit.stages.core.config import Recipe
from refit.stages.core.disk import full_disk_reported
from refit.stages.core.markers import is_done, output_fingerprint, recover


def _input(default):
    """An option that can change a stage's output: it enters the input fingerprint."""
    return field(default=default, metadata={"kind": "input"})


def _run_only(default):
    """An option that only watches or steers a run (a callback) and never changes its output:
    passed to the run function, never to the fingerprint."""
    return field(default=default, metadata={"kind": "run_only"})


@dataclass(frozen=True)
class StageOptions:
    """What a run passes to a stage besides the recipe and the workdir. Every option but
    `force` is declared as an input (fingerprinted) or run-only (never fingerprinted); a
    stage takes the ones its `Stage.takes` and `Stage.run_only` name and ignores the rest."""

    force: bool = False  # rerun even when the output is up to date (curate: start over)
    backend: str = _input("refit")  # evaluate: the benchmark scorer, "refit" or "lm-eval"
    previous_eval: dict | None = _input(None)  # audit: the eval report of the published version to beat
    on_progress: Callable[[dict], None] | None = _run_only(None)  # train: receives the newest metrics line


INPUT_OPTIONS = frozenset(f.name for f in fields(StageOptions) if f.metadata.get("kind") == "input")
RUN_ONLY_OPTIONS = frozenset(f.name for f in fields(StageOptions) if f.metadata.get("kind") == "run_only")


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name, the stages whose output it reads, the recipe sections
    its output depends on, its output folder under the workdir, and its functions."""

    name: str
    reads: tuple[str, ...]
    sections: tuple[str, ...]
    folder: str
    report: Any  # the type of what run_function returns: a TypedDict or a pydantic model
    run_function: Callable[..., Any]  # (recipe, workdir, force=..., **takes, **run_only) -> report
    fingerprint_function: Callable[..., str]  # (recipe, workdir, **takes) -> input fingerprint
    takes: tuple[str, ...] = ()  # input options (StageOptions) passed to both functions
    run_only: tuple[str, ...] = ()  # run-only options (StageOptions) passed to the run function alone
    # what else must hold outside the output folder for a done stage to count as done (publish:
    # the version is still in the registry and `latest` names the newest); (recipe, workdir) -> bool
    still_holds: Callable[[Recipe, Path], bool] | None = None
    # the few figures a flow's task keeps of the report (default: all of it, as JSON values)
    summarize: Callable[[Any], dict] | None = None

    def __post_init__(self) -> None:
        declared = {"input": (self.takes, INPUT_OPTIONS), "run-only": (self.run_only, RUN_ONLY_OPTIONS)}
        for kind, (names, allowed) in declared.items():
            if unknown := sorted(set(names) - allowed):
                raise ValueError(
                    f"stage {self.name}: unknown {kind} options {unknown} (StageOptions declares input "
                    f"{sorted(INPUT_OPTIONS)} and run-only {sorted(RUN_ONLY_OPTIONS)})"
                )

    def output(self, workdir: Path) -> Path:
        return Path(workdir) / self.folder

    def _options(self, options: StageOptions, names: tuple[str, ...]) -> dict:
        return {name: getattr(options, name) for name in names}

    def input_fingerprint(self, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> str:
        return self.fingerprint_function(recipe, Path(workdir), **self._options(options, self.takes))

    def is_done(self, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> bool:
        """Done for this input fingerprint, its output undamaged, and what else it needs holding."""
        done = is_done(self.output(workdir), self.input_fingerprint(recipe, workdir, options))
        return done and (self.still_holds is None or self.still_holds(recipe, Path(workdir)))

    def produced(self, workdir: Path, needed_by: str) -> str:
        """The fingerprint of this stage's finished output, for the stages that read it."""
        return output_fingerprint(self.output(workdir), self.name, needed_by)

    @cached_property
    def _report_type(self) -> TypeAdapter:
        return TypeAdapter(self.report)

    def run(self, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> Any:
        """Run the stage (a no-op returning its report when up to date) after putting right
        whatever a killed earlier run left in its output folder; a full disk ends it in one line.
        The report is checked against the stage's report type."""
        recover(self.output(workdir))
        taken = self._options(options, self.takes + self.run_only)
        with full_disk_reported(self.name, self.output(workdir)):
            report = self.run_function(recipe, Path(workdir), force=options.force, **taken)
        return self._report_type.validate_python(report)

    def as_json(self, report: Any) -> dict:
        return self._report_type.dump_python(report, mode="json")

    def summary(self, report: Any) -> dict:
        """What a flow's task keeps of a report: JSON values, small."""
        return self.summarize(report) if self.summarize else self.as_json(report)
