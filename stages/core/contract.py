"""The contract every stage keeps: one `Stage` description, one way to call it.

Each stage module ends with its `STAGE`; `refit.stages.pipeline` lists them in pipeline
order, and flows, the CLI, fingerprints and the sweep find stages there, never by name. A
stage declares once what it reads, the stages before it and the recipe's sections or fields,
and its input fingerprint and code version are derived from that declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from refit.stages.core.code_version import code_version
from refit.stages.core.config import Recipe, fields_along, fingerprinted, unfingerprinted, value_at
from refit.stages.core.disk import full_disk_reported
from refit.stages.core.markers import fingerprint, is_done, output_fingerprint, recover


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
    """One pipeline stage: its name, what it reads (the stages whose output it uses, the recipe
    sections and fields its output depends on), its output folder under the workdir, and its
    functions."""

    name: str
    reads: tuple[Stage, ...]
    # dotted paths: a section (`train`), a field (`train.seed`), a field of each item of a list
    # of sections (`evaluate.benchmarks.name`); checked against what its code reads (tests)
    recipe_reads: tuple[str, ...]
    folder: str
    report: Any  # the type of what run_function returns: a TypedDict or a pydantic model
    run_function: Callable[..., Any]  # (recipe, workdir, force=..., **takes, **run_only) -> report
    # what else the output depends on, beyond the recipe values and the stages it reads (the
    # content of input files, what "auto" resolves to here): (recipe, workdir) -> JSON values
    other_inputs: Callable[[Recipe, Path], Any] | None = None
    takes: tuple[str, ...] = ()  # input options (StageOptions) passed to the run function and fingerprinted
    run_only: tuple[str, ...] = ()  # run-only options (StageOptions) passed to the run function alone
    # what else must hold outside the output folder for a done stage to count as done (publish:
    # the version is still in the registry and `latest` names the newest); (recipe, workdir) -> bool
    still_holds: Callable[[Recipe, Path], bool] | None = None
    # the few figures a flow's task keeps of the report (default: all of it, as JSON values)
    summarize: Callable[[Any], dict] | None = None

    def __post_init__(self) -> None:
        for path in self.recipe_reads:
            try:
                fields_along(path)
            except ValueError as error:
                raise ValueError(f"stage {self.name} declares it reads {error}") from None
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

    @property
    def code_version(self) -> str:
        """What the code it runs does: the project modules its module imports and, of the
        recipe's module, what serves the recipe paths it declares (see `code_version`)."""
        return code_version(self.run_function.__module__, self.recipe_reads)

    def recipe_values(self, recipe: Recipe) -> dict[str, Any]:
        """The recipe values it declares, as fingerprints hold them: a field marked as entering
        no fingerprint (execution only, ...) is left out, on its own or inside a section."""
        return {
            path: fingerprinted(value_at(recipe, path.split(".")))
            for path in self.recipe_reads
            if not any(map(unfingerprinted, fields_along(path)))
        }

    def input_fingerprint(self, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> str:
        """The declared recipe values, the input options it takes, its other inputs, what the
        stages it reads produced (a clear error if one has not run) and its code version."""
        other = self.other_inputs(recipe, Path(workdir)) if self.other_inputs else None
        return self.fingerprint_with(recipe, workdir, other, options)

    def fingerprint_with(
        self, recipe: Recipe, workdir: Path, other_inputs: Any, options: StageOptions = StageOptions()
    ) -> str:
        """The input fingerprint from other inputs the run has gathered already (curate lists
        its input files once a run: a file arriving meanwhile is the next run's)."""
        inputs = {
            "recipe": self.recipe_values(recipe),
            "options": self._options(options, self.takes),
            "other": other_inputs,
        }
        upstream = [stage.produced(workdir, self.name) for stage in self.reads]
        return fingerprint(self.name, inputs, upstream, self.code_version)

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
