"""The manifest: what mix hands to training, as one typed, versioned record.

Written and read only through `write_manifest` and `load_manifest`. Reading checks the
version before anything else, so a manifest from another Refit version is refused with
what to rerun instead of failing later on a missing field. `sha256` covers every other
field (sorted-key JSON), and the mix marker records it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from refit.stages.core.markers import write_json_atomic
from refit.stages.core.schedule import Schedule

MANIFEST_VERSION = 2  # 2: no recipe name (renaming a recipe changes no plan)


class ManifestMismatch(ValueError):
    """A manifest this Refit cannot read: another version, or not a manifest at all."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Shard(_Record):
    path: str  # relative to the workdir
    rows: int
    sha256: str  # as tokenize wrote it; training checks it before reading


class SourcePlan(_Record):
    role: str
    rows: int
    tokens: int
    shards: list[Shard]
    drawn_sequences: int
    drawn_tokens: int
    epochs: float  # drawn / available rows; inf when drawn from an empty source


class PhasePlan(_Record):
    name: str
    lr_below: float | None  # None: the first phase, from step 0
    weights: dict[str, float]  # source -> share of the phase's sequences, summing to 1
    start_step: int
    steps: int
    start_fraction: float
    start_tokens: int
    tokens: int
    start_lr: float | None  # None when the phase never starts


class ScheduleSummary(_Record):
    """The schedule without its length (the manifest's total_steps)."""

    max_lr: float
    min_lr_ratio: float
    warmup_steps: int
    decay: str
    wsd_decay_steps: int

    @classmethod
    def of(cls, schedule: Schedule) -> ScheduleSummary:
        return cls(**{name: getattr(schedule, name) for name in cls.model_fields})


class Manifest(_Record):
    version: int
    tokenizer_sha256: str | None
    dtype: str | None
    eos_id: int | None
    seq_len: int
    sequences_per_step: int
    tokens_per_step: int
    total_steps: int
    total_tokens: int
    seed: int
    schedule: ScheduleSummary
    phases: list[PhasePlan]
    sources: dict[str, SourcePlan]
    warnings: list[str]
    sha256: str = ""

    def sealed(self) -> Manifest:
        """This manifest with `sha256` set over every other field."""
        content = json.dumps(self.model_dump(exclude={"sha256"}), sort_keys=True)
        return self.model_copy(update={"sha256": hashlib.sha256(content.encode()).hexdigest()})

    def lr_schedule(self) -> Schedule:
        """The LR schedule mix planned the phases on: training follows it step by step."""
        return Schedule(total_steps=self.total_steps, **self.schedule.model_dump())

    def drawn_sources(self) -> list[str]:
        """The sources training draws at least one sequence from."""
        return [name for name, source in self.sources.items() if source.drawn_sequences > 0]

    def summary(self) -> dict:
        """What a flow keeps of the manifest: its hash, size and where each phase starts."""
        return {
            "manifest_sha256": self.sha256,
            "total_steps": self.total_steps,
            "total_tokens": self.total_tokens,
            "phases": [{"name": p.name, "start_step": p.start_step} for p in self.phases],
        }


def write_manifest(path: Path, manifest: Manifest) -> None:
    # json.dumps, not model_dump_json: an infinite `epochs` must stay Infinity, not null
    write_json_atomic(path, manifest.model_dump())


def load_manifest(path: Path) -> Manifest:
    """The manifest at `path`; ManifestMismatch when it is of another version or malformed."""
    rerun = "rerun mix (`refit stage mix RECIPE --force`) and the stages after it"
    data = json.loads(Path(path).read_text())
    version = data.get("version") if isinstance(data, dict) else None
    if version != MANIFEST_VERSION:
        raise ManifestMismatch(
            f"{path} has manifest version {version!r}, this Refit reads version {MANIFEST_VERSION}: {rerun}"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestMismatch(f"{path} is not a valid manifest ({error.error_count()} problems): {rerun}") from None
