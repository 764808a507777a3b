"""The contract every stage keeps: one `Stage` description, one way to call it.

Each stage module ends with its `STAGE`; `refit.stages.registry` lists them in pipeline
order, and flows, the CLI, fingerprints and the sweep find stages there, never by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from refit.stages.lib.config import Recipe
from refit.stages.lib.markers import is_done, output_fingerprint, recover


@dataclass(frozen=True)
class StageOptions:
    """What a run passes to a stage besides the recipe and the workdir. A stage takes the
    options its `Stage.takes` names and ignores the rest."""

    force: bool = False  # rerun even when the output is up to date (curate: start over)
    backend: str = "refit"  # evaluate: the benchmark scorer, "refit" or "lm-eval"
    previous_eval: dict | None = None  # audit: the eval report of the published version to beat
    on_progress: Callable[[dict], None] | None = None  # train: receives the newest metrics line


OPTION_NAMES = frozenset(f.name for f in fields(StageOptions)) - {"force"}


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name, the stages whose output it reads, the recipe sections
    its output depends on, its output folder under the workdir, and its functions."""

    name: str
    reads: tuple[str, ...]
    sections: tuple[str, ...]
    folder: str
    run_function: Callable[..., dict]  # (recipe, workdir, force=..., **takes) -> report
    fingerprint_function: Callable[..., str]  # (recipe, workdir, **takes) -> input fingerprint
    takes: tuple[str, ...] = ()  # StageOptions fields passed to both functions (besides force)

    def __post_init__(self) -> None:
        if unknown := set(self.takes) - OPTION_NAMES:
            raise ValueError(f"stage {self.name}: unknown options {sorted(unknown)}")

    def output(self, workdir: Path) -> Path:
        return Path(workdir) / self.folder

    def _taken(self, options: StageOptions, for_fingerprint: bool) -> dict:
        names = [n for n in self.takes if not (for_fingerprint and n == "on_progress")]
        return {name: getattr(options, name) for name in names}

    def input_fingerprint(self, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> str:
        return self.fingerprint_function(recipe, Path(workdir), **self._taken(options, for_fingerprint=True))

    def is_done(self, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> bool:
        return is_done(self.output(workdir), self.input_fingerprint(recipe, workdir, options))

    def produced(self, workdir: Path, needed_by: str) -> str:
        """The fingerprint of this stage's finished output, for the stages that read it."""
        return output_fingerprint(self.output(workdir), self.name, needed_by)

    def run(self, recipe: Recipe, workdir: Path, options: StageOptions = StageOptions()) -> dict:
        """Run the stage (a no-op returning its report when up to date) after putting right
        whatever a killed earlier run left in its output folder."""
        recover(self.output(workdir))
        return self.run_function(recipe, Path(workdir), force=options.force, **self._taken(options, False))
