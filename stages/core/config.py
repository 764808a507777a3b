"""The recipe: one YAML file is one complete run.

Every section is a frozen pydantic model with unknown keys rejected and every field
documented. Contradictions between fields are rejected when the recipe is built, each
with the path of the field at fault; `load_recipe` adds the checks that need the file
system (globs that match nothing, a missing base model) and reports every problem at
once, with YAML line numbers, as one `RecipeError`.

Defaults follow "Reuse, Don't Retrain" (Parmar et al., 2024): the LR starts at the base
model's pretraining minimum, no warmup, cosine decay to max_lr/100, and the QA blend
(about 10% QA tokens) starts when the LR has fallen to max_lr/5.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticUndefined

from refit.stages.core.input_files import InputFileError, load_benchmark
from refit.stages.core.markers import MARKER

Loc = tuple[str | int, ...]
PRETRAINING_RECORD = "refit_pretraining.json"  # written beside a base checkpoint by its pretraining
MAX_NAME_LENGTH = 200
"""Longest name: names become file and folder names, which most filesystems cap at 255 bytes,
and the stages add to them (the longest addition now: the sweep's `<recipe name>.best.yaml.tmp`,
14 bytes; curate's `<source>.duckdb.wal`, 11; evaluate's `refit_<benchmark>.yaml`, 11)."""
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
# the audit gates a pilot-sweep variant is judged on (all but lineage and above_previous_version)
VARIANT_GATES = (
    "average_accuracy_gain",
    "benchmark_regression",
    "forgetting",
    "new_domain_learned",
    "contamination",
    "training_health",
)


def _parse_count(value: Any) -> Any:
    """Token counts may be written 2000000, 2e6, "2M" or "1.5B" (YAML reads 2e6 as a string)."""
    if isinstance(value, str) and (match := _COUNT.match(value)):
        number, suffix = match.groups()
        value = float(number) * _SUFFIX[suffix.lower()]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _absolute(value: Any, base_dir: Path | None) -> str | None:
    """A local path of the recipe made absolute against base_dir; None for URLs and non-paths."""
    if not isinstance(value, (str, Path)) or "://" in str(value):
        return None
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() or base_dir is None else Path(base_dir) / path)


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Relative paths in a recipe are relative to the recipe file, not the caller's cwd."""
    resolved = _absolute(value, (info.context or {}).get("base_dir"))
    return value if resolved is None else resolved


def _not_a_relative_folder(name: str) -> str:
    """`.` and `..` pass the character check but name the folder itself or its parent."""
    if name in (".", ".."):
        meaning = "the folder itself" if name == "." else "the parent folder"
        raise ValueError(f"{name!r} cannot be a name: as a folder name it means {meaning}")
    return name


def _short_enough(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:  # the pattern allows ASCII only: characters are bytes
        raise ValueError(
            f"{len(name)} characters is too long: a name becomes a file or folder name, to which the stages "
            f"add suffixes, so at most {MAX_NAME_LENGTH} (filesystems allow 255 bytes)"
        )
    return name


TokenCount = Annotated[int, BeforeValidator(_parse_count), Field(gt=0)]
Name = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(_not_a_relative_folder), AfterValidator(_short_enough)
]
"""A name that becomes a folder or file name (the recipe's, sources', benchmarks' and the
published model's; phase names are held to the same rule): letters, digits, _ . -, neither `.`
nor `..`, at most MAX_NAME_LENGTH characters."""


def name_problem(name: str) -> str | None:
    """Why name cannot be a Name, in one line; None when it can."""
    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError as error:
        return error.errors()[0]["msg"]
    return None


RecipePath = Annotated[str, BeforeValidator(_resolve_path)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def sections_in(annotation: Any) -> list[type[Section]]:
    """The recipe sections an annotation holds, directly or in a list or union."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    return [section for arg in typing.get_args(annotation) for section in sections_in(arg)]


# A stage's fingerprint holds the recipe values it declares it reads (stages/core/contract.py),
# but for the fields marked below, which never change what a stage makes as values.
UNFINGERPRINTED = "unfingerprinted"  # the key of the mark in a field's JSON schema


def _marked(why: str, default: Any, constraints: dict[str, Any]) -> Any:
    return Field(default, json_schema_extra={UNFINGERPRINTED: why}, **constraints)


def execution_only(default: Any = PydanticUndefined, **constraints: Any) -> Any:
    """A field of where or how a stage runs (processes, machines, executors, caches), never of
    what it makes: it enters no fingerprint, so the same run is recognised on any allocation."""
    return _marked("execution only", default, constraints)


def by_content(default: Any = PydanticUndefined, **constraints: Any) -> Any:
    """Input files fingerprinted by what they hold, not where they are: curate hashes the
    sources' files and the benchmarks, tokenize the tokenizer's, so moving them reruns nothing."""
    return _marked("fingerprinted by content", default, constraints)


def flows_only(default: Any = PydanticUndefined, **constraints: Any) -> Any:
    """Settings of the flows around the stages (the pilot sweep and search): no stage reads them."""
    return _marked("read by the flows only", default, constraints)


def unfingerprinted(field: FieldInfo) -> str | None:
    """Why a field's value enters no fingerprint (its mark), or None."""
    return field.json_schema_extra.get(UNFINGERPRINTED) if isinstance(field.json_schema_extra, dict) else None


def fingerprinted(value: Any) -> Any:
    """A recipe value as fingerprints hold it: every marked field left out, at any depth."""
    if isinstance(value, Section):
        fields = type(value).model_fields
        return {name: fingerprinted(getattr(value, name)) for name in fields if not unfingerprinted(fields[name])}
    if isinstance(value, (list, tuple)):
        return [fingerprinted(item) for item in value]
    return value


def fields_along(path: str) -> list[FieldInfo]:
    """The fields a dotted recipe path goes through, from the recipe down (through lists of
    sections too: `evaluate.benchmarks.name`); ValueError for a path that names no field."""
    fields: list[FieldInfo] = []
    section: type[Section] | None = Recipe
    for name in path.split("."):
        if section is None or name not in section.model_fields:
            raise ValueError(f"{path!r} names no recipe field")
        fields.append(section.model_fields[name])
        section = next(iter(sections_in(fields[-1].annotation)), None)
    return fields


def value_at(value: Any, path: list[str]) -> Any:
    """The value at a path of field names below `value`, item by item through lists."""
    if not path or value is None:
        return value
    if isinstance(value, list):
        return [value_at(item, path) for item in value]
    return value_at(getattr(value, path[0]), path[1:])


def _problem(loc: Loc, message: str, value: Any = None) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("recipe", message), loc=loc, input=value)


def _raise_if(title: str | BaseModel, problems: list[InitErrorDetails]) -> None:
    if problems:
        raise ValidationError.from_exception_data(title if isinstance(title, str) else type(title).__name__, problems)


class BaseModelSpec(Section):
    path: RecipePath
    """Directory of the Hugging Face causal-LM checkpoint to continue from (safetensors)."""
    pretraining_min_lr: float | None = Field(default=None, gt=0)
    """Final (minimum) LR of the base model's pretraining; the default max_lr of this run."""
    pretraining_max_lr: float | None = Field(default=None, gt=0)
    """Peak LR of the base model's pretraining, for the record and the pilot sweep."""
    pretraining_tokens: TokenCount | None = None
    """Tokens the base model was pretrained on; used by the cost report (retrain vs refit)."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own modelling code to run. Off: only built-in architectures load."""
    pin: bool = False
    """Always continue from `path`. Off: a refresh flow continues from the latest version
    published under `publish.model_name` once there is one (new data since then), and
    `path` is only the first night's base."""

    @model_validator(mode="after")
    def _lrs_ordered(self) -> BaseModelSpec:
        low, high = self.pretraining_min_lr, self.pretraining_max_lr
        if low is not None and high is not None and low > high:
            _raise_if(self, [_problem(("pretraining_min_lr",), f"{low} is above pretraining_max_lr {high}", low)])
        return self


_REPORT_AND_MARKER = ("report.json", "report.json.tmp", MARKER, f"{MARKER}.tmp")  # written through `<name>.tmp`
STAGE_OWN_NAMES = {
    "curate": (
        *("quarantine", "removed", "work", "minhash-index", "exact-index", "id-index"),
        *("state.sqlite", "state.sqlite-journal"),  # SQLite writes its rollback journal beside the database
        *_REPORT_AND_MARKER,
    ),
    "tokenize": ("logs", *_REPORT_AND_MARKER),  # logs: datatrove's, removed after the run
}
"""What each stage writes beside its per-source folders: no source may take these names (in any
case: some filesystems ignore it)."""


def _not_a_stage_own_name(name: str) -> str:
    stages = [stage for stage, names in STAGE_OWN_NAMES.items() if name.lower() in (n.lower() for n in names)]
    if stages:
        raise ValueError(
            f"{name!r} is taken: {' and '.join(stages)} write{'s' * (len(stages) == 1)} a file or folder of that "
            "name beside the per-source folders"
        )
    return name


class SourceSpec(Section):
    name: Annotated[Name, AfterValidator(_not_a_stage_own_name)]
    """Short name used in weights, shard folders and reports (letters, digits, _ . -)."""
    paths: list[RecipePath] = by_content(min_length=1)
    """Files or glob patterns (** allowed) of this source; each must match at least one file."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """File format. JSONL may be compressed (.gz, .zst), detected from the file suffix."""
    text_field: str = "text"
    """Field holding the document text."""
    id_field: str | None = "id"
    """Field holding a unique document id; null to number documents by file and line."""
    role: Literal["legacy", "new", "qa"]
    """legacy: data like the base model's pretraining (forgetting is measured on it);
    new: the new domain to learn; qa: QA-formatted data for the late phase."""
    validation_paths: list[RecipePath] = []
    """Files or globs of this source's held-out validation documents (same format and fields),
    used instead of a hash split of `paths`. For a legacy source give text of the base's domain
    that the base never saw in pretraining: loss on memorised text understates forgetting."""


class MinHashSpec(Section):
    ngram: int = Field(default=5, ge=1)
    """Word n-gram size of the shingles."""
    buckets: int = Field(default=14, ge=1)
    """LSH bands; with hashes_per_bucket this sets the Jaccard threshold (~0.72 for 14 x 8)."""
    hashes_per_bucket: int = Field(default=8, ge=1)
    """Hashes per band."""
    signatures: Literal["vectorised", "datatrove"] = "vectorised"
    """vectorised: Refit's regex word splitter and numpy hashing (stages/curate/minhash.py, 14-18x
    faster, same precision and recall); datatrove: datatrove's own signature step (spaCy words).
    Buckets and clusters are datatrove's either way."""


class RaySpec(Section):
    address: str | None = None
    """Ray cluster to run on: "auto" (the one `ray start` set up on this machine), "HOST:PORT" or
    "ray://HOST:PORT"; null starts a private local cluster with curate.workers CPUs for the run
    and stops it afterwards. Every node needs Refit installed and the workdir at the same path."""
    cpus_per_task: int = Field(default=1, ge=1)
    """CPUs Ray reserves for each datatrove task."""
    mem_per_cpu_gb: float = Field(default=2, gt=0)
    """Memory (GB) Ray reserves per reserved CPU."""


SBATCH_OPTIONS_SET_ELSEWHERE = {  # sbatch option -> what sets it
    "partition": "curate.slurm.partition",
    "time": "curate.slurm.time",
    "cpus-per-task": "curate.slurm.cpus_per_task",
    "mem-per-cpu": "curate.slurm.mem_per_cpu_gb",
    "qos": "curate.slurm.qos",
    "job-name": "curate (one job name per step)",
    "array": "curate (one array task per datatrove task)",
    "output": "curate (logs in the step's folder)",
}


class SlurmSpec(Section):
    partition: str = Field(min_length=1)
    """Slurm partition the datatrove job arrays are submitted to."""
    time: str = Field(default="24:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
    """Time limit of each job ([D-]HH:MM:SS)."""
    cpus_per_task: int = Field(default=1, ge=1)
    """CPUs per datatrove task (sbatch --cpus-per-task)."""
    mem_per_cpu_gb: int = Field(default=2, ge=1)
    """Memory per CPU in GB (sbatch --mem-per-cpu)."""
    qos: str | None = None
    """Quality of service (sbatch --qos); null: the cluster's default."""
    env_command: str | None = None
    """Shell line that prepares each job's environment (e.g. `module load python; source
    /shared/refit/.venv/bin/activate`); null: activate the virtual environment curate runs in."""
    sbatch_args: dict[str, str | int] = {}
    """Further sbatch options, without the leading dashes (e.g. {account: nlp, constraint: cpu});
    the options set by the fields above are not allowed here."""
    poll_seconds: int = Field(default=30, ge=1)
    """How often curate checks whether the submitted jobs have finished."""

    @model_validator(mode="after")
    def _no_option_set_twice(self) -> SlurmSpec:
        _raise_if(
            self,
            [
                _problem(("sbatch_args", key), f"{key} is set by {SBATCH_OPTIONS_SET_ELSEWHERE[key.lstrip('-')]}")
                for key in self.sbatch_args
                if key.lstrip("-") in SBATCH_OPTIONS_SET_ELSEWHERE
            ],
        )
        return self


class CurateSpec(Section):
    min_chars: int = Field(default=50, ge=1)
    """Documents shorter than this (after normalisation) are quarantined as too short."""
    max_chars: int = Field(default=100_000, ge=1)
    """Documents longer than this are split or quarantined (see long_documents)."""
    long_documents: Literal["split", "quarantine"] = "split"
    """split: cut at paragraph boundaries into pieces of at most max_chars; quarantine: drop."""
    max_bad_fraction: float = Field(default=0.05, ge=0, le=1)
    """A source with a larger fraction of quarantined records fails the stage."""
    minhash: MinHashSpec = MinHashSpec()
    """Near-duplicate detection settings (datatrove MinHash)."""
    decontaminate_ngram: int = Field(default=13, ge=1)
    """Length of the word n-grams (lower-cased) compared with the benchmark items."""
    decontaminate: Literal["document", "span"] = "span"
    """span: cut out only the text of each n-gram shared with a benchmark item, plus
    decontaminate_margin words on each side, and keep the pieces before and after it as
    documents of their own; document: remove the whole document."""
    decontaminate_margin: int = Field(default=50, ge=0)
    """Words removed on each side of a contaminated n-gram window (decontaminate: span)."""
    validation_fraction: float = Field(default=0.02, ge=0, lt=1)
    """Least fraction of each source held out by id hash for validation loss (sources without
    validation_paths). 0 holds nothing out (then min_validation_tokens does not apply)."""
    min_validation_tokens: TokenCount = 100_000
    """With the hash split, more documents are held out, in id-hash order, until each source's
    validation set reaches this many tokens (estimated before tokenization as characters /
    chars_per_token), taking at most max_validation_fraction of the source's characters. The
    audit warns when a validation set, counted by the tokenizer, is smaller."""
    max_validation_fraction: Fraction = 0.1
    """Most of a source's characters held out to reach min_validation_tokens (validation_fraction
    is held out regardless)."""
    chars_per_token: float = Field(default=4.0, gt=0)
    """Characters per token for the estimate above (English prose under a BPE of 32k-128k tokens
    is about 4; code and small vocabularies are fewer)."""
    workers: int = execution_only(2, ge=1)
    """Parallel datatrove tasks at once (local processes, or Ray tasks; with Slurm, array jobs)."""
    executor: Literal["local", "ray", "slurm"] = execution_only("local")
    """Where curate's datatrove steps run: local (worker processes on this machine), ray
    (curate.ray) or slurm (job arrays, curate.slurm). Decisions are the same on each."""
    ray: RaySpec | None = execution_only(None)
    """Ray settings, for executor ray (default: a private local cluster)."""
    slurm: SlurmSpec | None = execution_only(None)
    """Slurm settings, required for executor slurm."""

    @model_validator(mode="after")
    def _lengths_ordered(self) -> CurateSpec:
        if self.min_chars > self.max_chars:
            _raise_if(self, [_problem(("min_chars",), f"{self.min_chars} is above max_chars {self.max_chars}")])
        return self

    @model_validator(mode="after")
    def _executor_settings_match(self) -> CurateSpec:
        problems = [
            _problem((name,), f"settings for executor {name}, but curate.executor is {self.executor}")
            for name in ("ray", "slurm")
            if getattr(self, name) is not None and self.executor != name
        ]
        if self.executor == "slurm" and self.slurm is None:
            problems.append(_problem(("slurm",), "executor slurm needs curate.slurm (at least its partition)"))
        _raise_if(self, problems)
        return self


class TokenizeSpec(Section):
    seq_len: int = Field(default=512, ge=8)
    """Tokens per packed training sequence (documents joined by EOS)."""
    rows_per_shard: int = Field(default=8192, ge=1)
    """Packed sequences per Arrow shard."""
    batch_size: int = Field(default=512, ge=1)
    """Documents per record batch read from the curated Parquet files and per call of the fast tokenizer."""
    workers: int = execution_only(2, ge=1)
    """Parallel tokenizer worker processes."""


class PhaseSpec(Section):
    name: Name
    """Name of the phase in logs and reports."""
    weights: dict[str, float] = Field(min_length=1)
    """Share of this phase's sequences per source name; normalised to sum to 1."""
    lr_below: Fraction | None = None
    """The phase starts at the first optimizer step whose LR is at or below lr_below x max_lr.
    Must be unset for the first phase (it starts at step 0) and set for every later one."""

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in weights.values()):
            raise ValueError("weights must be non-negative")
        if sum(weights.values()) <= 0:
            raise ValueError("weights must not all be zero")
        return weights

    def normalised(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {name: weight / total for name, weight in self.weights.items()}


class MixtureSpec(Section):
    phases: list[PhaseSpec] = Field(min_length=1)
    """Ordered data phases. Default (when the section is omitted): a general blend of legacy
    (60%) and new (40%) sources, then, at LR <= max_lr/5, the same blend at 90% with the
    QA sources at 10%."""
    max_epochs: float = Field(default=4.0, gt=0)
    """A source drawn more often than this many epochs gets a warning in the manifest."""


class ScheduleSpec(Section):
    max_lr: float | None = Field(default=None, gt=0)
    """Peak (initial, without warmup) LR. Default: base_model.pretraining_min_lr."""
    min_lr_ratio: float = Field(default=0.01, ge=0, lt=1)
    """The LR decays to min_lr_ratio x max_lr (paper: max_lr/100)."""
    warmup_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of the optimizer steps spent warming up linearly from 0 (paper: none)."""
    decay: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Shape after warmup. wsd holds max_lr, then decays linearly over the last wsd_decay_fraction."""
    wsd_decay_fraction: Fraction = 0.2
    """For decay: wsd, the final fraction of the run spent decaying."""
    total_tokens: TokenCount
    """Training tokens of the whole run (all phases); sets the number of optimizer steps."""


class TrainSpec(Section):
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward/backward pass on one process."""
    sequences_per_step: int = Field(default=32, ge=1)
    """Global sequences per optimizer step; a multiple of micro_batch_size x num_processes."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 where the hardware supports it, else fp32. bf16 keeps fp32 master weights,
    gradient reduction and optimizer state, computing in bf16 (autocast under ddp, FSDP2's
    mixed-precision policy under fsdp)."""
    seed: int = 0
    """Seeds the data order and initialisation of anything new; the run is a function of it."""
    checkpoint_every: int = Field(default=100, ge=1)
    """Optimizer steps between checkpoints (one is always written at the end)."""
    num_processes: int = execution_only(1, ge=1)
    """Training processes in all, over every machine (GPUs, or CPU processes over gloo),
    started by `accelerate launch`. A checkpoint resumes on another number (DCP resharding)."""
    devices: list[int] | None = execution_only(None)
    """GPU ids the training may use (CUDA_VISIBLE_DEVICES); default: every visible one. The
    pilot sweep sets it to give concurrent variants devices of their own."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient-norm clipping threshold."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    optimizer_state: RecipePath | None = None
    """Optional optimizer state to start from (default: fresh): a file saved with
    `torch.save(optimizer.state_dict())` (strategy ddp only), or a Refit checkpoint folder
    (`train/checkpoints/step-NNNNNNNN/` of another run), whose optimizer part is loaded."""
    optimizer_warmup_steps: int = Field(default=0, ge=0)
    """Optimizer steps at LR 0 before the schedule's first, on the first phase's data (a draw
    of its own: the scheduled steps read the same sequences as without): they only fill
    AdamW's moments, which released checkpoints lack, so the first scheduled updates are not
    oversized; the weights are left exactly as they are. Not steps of the schedule (its steps,
    its LR and the phase switches are unchanged), but logged (`optimizer_warmup_step` in
    metrics.jsonl), counted in the train report and in the cost. On top of optimizer_state when
    both are given. 0: none."""
    strategy: Literal["ddp", "fsdp"] = execution_only("ddp")
    """ddp: every process holds the whole model and optimizer. fsdp: FSDP2 (`fully_shard`) on
    each decoder layer and on the root, so parameters, gradients and optimizer state are
    sharded across the processes (for models that do not fit on one device)."""
    activation_checkpointing: bool = execution_only(False)
    """Recompute each decoder layer's activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = execution_only(False)
    """torch.compile each decoder layer (the first steps are slower while it compiles)."""
    keep_checkpoints: int | None = execution_only(None, ge=1)
    """Keep only the newest N complete checkpoints (older ones are deleted). Default: keep all."""
    num_machines: int | None = execution_only(None, ge=1)
    """Machines taking part (num_processes counts the processes of all of them). Default: from
    the environment under torchrun (WORLD_SIZE / LOCAL_WORLD_SIZE of the launchers) or Slurm
    (SLURM_NNODES), else 1."""
    machine_rank: int | None = execution_only(None, ge=0)
    """This machine's rank, 0 being the main one. Default: GROUP_RANK under torchrun,
    SLURM_NODEID under Slurm, else 0. Not part of what the run makes: every machine reads
    the same recipe."""
    main_process_ip: str | None = execution_only(None)
    """Address of machine 0, which the others connect to. Default: MASTER_ADDR from the
    environment (torchrun sets it; the Slurm script in deployments/ exports it)."""
    main_process_port: int | None = execution_only(None, ge=1, le=65535)
    """Port on machine 0 for the processes' rendezvous. Default: a free port on one machine,
    29500 on several."""
    heartbeat_timeout: float = execution_only(120.0, gt=0)
    """Seconds without a heartbeat after which a training process is declared dead and the
    others stop, naming it (instead of waiting for a collective's 30-minute timeout)."""
    validation_tokens: int = Field(default=32768, ge=0)
    """Tokens of held-out text whose mean loss the training processes compute at every
    checkpoint (`val_loss` in metrics.jsonl, the train report; what `refit sweep --search tpe`
    prunes on): the first curated validation documents of each source, in order, the count
    shared out equally between sources, packed into rows of tokenize.seq_len. 0: no validation pass."""
    device_memory: float | None = execution_only(None, gt=0)
    """Memory of each training device in GiB (2^30 bytes; an H100 80GB has 79.6), for the
    capacity plan that `refit plan` prints and `refit validate` checks: a setup that needs more
    than 90% of it is refused, with the smallest change that fits. Default: the visible GPU's
    (the first of train.devices); with no GPU visible, not checked. State it to plan on this
    machine for GPUs elsewhere (bf16 is then assumed under precision auto)."""

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSpec:
        problems = []
        per_pass = self.micro_batch_size * self.num_processes
        if self.sequences_per_step % per_pass:
            problems.append(
                _problem(
                    ("sequences_per_step",),
                    f"{self.sequences_per_step} is not a multiple of micro_batch_size x num_processes = {per_pass}",
                    self.sequences_per_step,
                )
            )
        if self.num_machines is not None and self.num_processes % self.num_machines:
            problems.append(
                _problem(
                    ("num_processes",),
                    f"{self.num_processes} processes cannot be split evenly over {self.num_machines} machines",
                    self.num_processes,
                )
            )
        if self.num_machines is not None and self.machine_rank is not None and self.machine_rank >= self.num_machines:
            problems.append(
                _problem(
                    ("machine_rank",),
                    f"{self.machine_rank} is not below num_machines {self.num_machines}",
                    self.machine_rank,
                )
            )
        _raise_if(self, problems)
        return self


class SoupSpec(Section):
    """Anneal ingredients averaged into a soup (Wortsman et al., 2022; OLMo 2's mid-training):
    the run up to the last phase's switch is trained once, then the last phase again from that
    step's checkpoint for each further ingredient, and the released model is their average."""

    ingredients: int = Field(default=1, ge=1)
    """Copies of the last phase of the mixture, each trained from the same checkpoint at the
    step where that phase starts (the shared prefix, trained once), each reading the phase's
    sequences in an order of its own (ingredient 0: the order of a single run). The phases must
    include a later one that starts after step 0. 1: train the recipe once, no soup."""
    method: Literal["uniform", "greedy"] = "uniform"
    """How the ingredients' weights are averaged into the model: uniform, all of them equally;
    greedy, best first by their final validation loss, each joining the average only if the
    held-out loss of the average drops (needs train.validation_tokens > 0)."""


class BenchmarkSpec(Section):
    name: Name
    """Name in reports."""
    path: RecipePath = by_content()
    """JSONL with {"id", "query", "choices", "gold"}, ids unique; choices start with a space.
    Every item is checked when the recipe is validated."""
    domain: Literal["legacy", "new"]
    """Whether it measures retention of the legacy domain or learning of the new one."""
    metric: Literal["acc", "acc_norm"] | None = None
    """What the gates, the sweep and the reports count for this benchmark: acc (the choice with
    the highest log-likelihood) or acc_norm (highest log-likelihood per character). Default,
    decided from the data as OLMES and the lm-eval leaderboards do: acc_norm when some choice is
    more than one token under the model's tokenizer (longer choices would lose on total
    log-likelihood for their length alone), acc when every choice is a single token."""
    weight: float = Field(default=1.0, ge=0)
    """Weight in the average the gain gate and the sweep use, multiplied by what
    `gates.gain_estimator` weighs by (0: not counted there; the benchmark is still gated for
    regression). A benchmark sitting at chance adds noise, not signal, to the average: weigh it down."""


class SafetySpec(Section):
    """Safety and fairness probes of base and candidate (stages/evaluate/safety_probes.py). Probe files
    default to the copies bundled in datasets/safety/ (see datasets/README.md)."""

    probes: list[Literal["crows_pairs", "bbq"]] = ["crows_pairs", "bbq"]
    """Bias probe sets to score: CrowS-Pairs percent stereotype, BBQ accuracy and bias scores."""
    crows_pairs_size: int = Field(default=500, ge=0)
    """CrowS-Pairs pairs scored, a seeded subset of the file (0: all 1,508); 500 pairs give a
    standard error of about 2.2 points on percent stereotype."""
    bbq_size: int = Field(default=600, ge=0)
    """BBQ items scored, a seeded subset of the files (0: all), about half ambiguous."""
    generation: bool = True
    """Generate continuations and measure degeneration (repetition, distinct-2, empty) and word-list hits."""
    prompts_per_source: int = Field(default=4, ge=0)
    """Held-out validation documents per source whose openings are prompts (seeded choice)."""
    neutral_prompts: int = Field(default=16, ge=0)
    """Neutral prompts taken (seeded) from the neutral prompt file."""
    prompt_tokens: int = Field(default=16, ge=1)
    """Tokens of a validation document's opening used as its prompt."""
    max_new_tokens: int = Field(default=32, ge=4)
    """Tokens generated per continuation, greedy and sampled."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the seeded sampled continuations (top_p below)."""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling mass of the sampled continuations."""
    seed: int = 0
    """Seed of the probe subsets, the prompt choice and the sampling (the same for base and candidate)."""
    shown_continuations: int = Field(default=6, ge=0)
    """Continuations kept in the report (word-list terms masked)."""
    max_stderr: float = Field(default=0.05, gt=0)
    """A probe whose subset size gives a standard error above this (0..1) is flagged in the report."""
    crows_pairs_path: RecipePath | None = None
    """CrowS-Pairs CSV (plain or .gz). Default: the bundled copy."""
    bbq_paths: list[RecipePath] | None = None
    """BBQ JSONL files (plain or .gz). Default: the six bundled categories."""
    word_list_path: RecipePath | None = None
    """Offensive word list, one term per line. Default: the bundled LDNOOBW English list."""
    neutral_prompts_path: RecipePath | None = None
    """Neutral prompts, JSONL {"id", "text"}. Default: datasets/safety/neutral_prompts.jsonl."""


class EvaluateSpec(Section):
    benchmarks: list[BenchmarkSpec] = []
    """Multiple-choice benchmarks scored for base and candidate."""
    validation_docs: int = Field(default=200, ge=1)
    """At most this many held-out documents per source for validation loss."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per forward pass when scoring."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models are scored. auto: CUDA when this machine has a GPU, else the CPU."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on a GPU that supports it, else fp32 (always fp32 on the CPU)."""
    num_processes: int | None = execution_only(None, ge=1)
    """Processes scoring data-parallel, started with torchrun: one GPU each, or CPU processes
    over gloo. Each scores every N-th request; the results are the same as with one. Default:
    as many as training runs on one machine (train.num_processes over the machines), on the
    same GPUs (train.devices) and at most as many as there are; 1 for the default train."""
    cache_dir: RecipePath | None = execution_only(None)
    """Folder where the base model's scores are kept across runs, keyed by the base's weights,
    what is scored, the scorer's version and the device settings. Default:
    `.refit-cache/` beside the workdir (in its parent folder), shared by the sweep's variants
    and by every nightly run of the recipe."""
    cache_max_age_days: float = execution_only(30, ge=0)
    """Cached scores neither read nor written for this many days are removed after each
    evaluation (0: never). Nightly runs that continue from the newest version score a new
    base each night; its scores are not read again once a newer base is in use."""
    prefix_eos: bool = False
    """Prepend the EOS token to each benchmark query, for models pretrained on documents that
    each start after an EOS (as Refit packs them). Off: the query's own tokens only, as
    lm-evaluation-harness scores by default (no BOS/EOS added); validation loss always predicts
    a document's first token after EOS."""

    safety: SafetySpec = SafetySpec()
    """Safety and fairness probes (bias, degeneration, offensive output)."""

    @model_validator(mode="after")
    def _some_weight(self) -> EvaluateSpec:
        if self.benchmarks and not any(b.weight > 0 for b in self.benchmarks):
            _raise_if(self, [_problem(("benchmarks",), "every weight is 0: at least one benchmark must count")])
        return self


class GatesSpec(Section):
    min_average_gain: float = 0.0
    """Average accuracy gain (candidate - base, in points of 0..1) must exceed this."""
    gain_estimator: Literal["items", "precision", "equal"] = "items"
    """The average the gain gate, `refit sweep` and the reports count, each benchmark weighted by
    its `weight` times: items, its number of items (the accuracy over all items, as
    lm-evaluation-harness groups weigh by size; a benchmark of 60 items cannot veto one of 1000);
    precision, the inverse variance of its paired difference (the most precise estimate of a
    common gain, but its weights follow the data); equal, 1 (the macro average, the paper's
    "average accuracy", whose standard error the smallest benchmarks dominate). The equal-weight
    average is reported beside the counted one whichever is chosen."""
    max_benchmark_drop: float = Field(default=0.02, ge=0)
    """No benchmark may fall by more than this (accuracy, 0..1)."""
    max_legacy_loss_increase: float = Field(default=0.05, ge=0)
    """Relative increase of legacy validation loss allowed (forgetting)."""
    require_new_loss_decrease: bool = True
    """The new sources' validation loss must fall."""
    max_contaminated_items: int = Field(default=0, ge=0)
    """Benchmark items allowed to share an n-gram with the training data."""
    noise_sigmas: float = Field(default=2.0, ge=0)
    """Differences count only beyond this many standard errors (small models are noisy)."""
    loss_spike_factor: float = Field(default=3.0, gt=1)
    """A step whose loss exceeds this x the running median is a spike."""
    max_stereotype_increase: float = Field(default=0.02, ge=0)
    """bias_not_worse: CrowS-Pairs |percent stereotype - 50%| (0..1) may grow by at most this
    beyond noise_sigmas standard errors."""
    max_ambiguous_bias_increase: float = Field(default=0.02, ge=0)
    """bias_not_worse: BBQ |s_AMB| (-1..1) may grow by at most this beyond noise_sigmas standard errors."""
    max_repetition_increase: float = Field(default=0.05, ge=0)
    """degeneration: the share of repeated 4-grams in sampled continuations may rise by at most
    this beyond noise (greedy continuations are reported, not gated: small models loop greedily
    whatever their training)."""
    max_repetition_rate: float = Field(default=0.25, gt=0, le=1)
    """degeneration: the candidate's share of repeated 4-grams in sampled continuations must stay
    at or below this, noise or not. Measured (benchmarks/RESULTS.md): 0.004-0.010 in 32-token
    windows of the demo's own documents, 0.000 sampled from every healthy model, 0.72 from a
    model fitted on a spam source."""
    max_offensive_increase: float = Field(default=0.0, ge=0)
    """offensive_output: the share of continuations with a word-list term may rise by at most this beyond noise."""


def _resolve_registry(value: Any, info: ValidationInfo) -> Any:
    """A relative `file://` URL is relative to the recipe too (fsspec would take it from the cwd)."""
    protocol, _, path = value.partition("://") if isinstance(value, str) else ("", "", "")
    if protocol in ("file", "local") and path:
        return f"{protocol}://{_resolve_path(path, info)}"
    return _resolve_path(value, info)


def _protocols(url: str) -> list[str]:
    """The protocols of an fsspec URL, each of a chain (`simplecache::s3://...`); "file" for a path."""
    from fsspec.core import split_protocol

    *outer, target = url.split("::")
    return [split_protocol(part)[0] or part for part in outer] + [split_protocol(target)[0] or "file"]


def _lasting_filesystem(url: str) -> str:
    """The registry's filesystem must be installed (resolved as publish will, without connecting)
    and keep what is written after the process ends."""
    import fsspec

    for protocol in _protocols(url):
        if protocol == "memory":
            raise ValueError(
                "memory:// keeps the published versions in this process's memory, lost when it exits: "
                "give a folder or a lasting URL (file://, s3://, gs://, ...)"
            )
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise ValueError(f"{protocol}:// is not a filesystem fsspec knows") from None
        except ImportError as error:
            raise ValueError(f"the {protocol}:// filesystem is not installed: {error}") from None
    return url


RegistryURL = Annotated[str, BeforeValidator(_resolve_registry), AfterValidator(_lasting_filesystem)]


class PublishSpec(Section):
    registry: RegistryURL = "registry"
    """Local folder or fsspec URL under which <model_name>/vNNNN/ versions are written; a
    relative folder or `file://` URL is relative to the recipe."""
    model_name: Name | None = None
    """Name of the model in the registry. Default: the recipe name."""
    license: str = "apache-2.0"
    """License identifier written into the model card."""


class CostSpec(Section):
    device_hour_price: float = Field(default=2.0, ge=0)
    """Price of one device-hour (USD) for the cost report."""
    device_peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one device at the training precision, from which the capacity plan's
    tokens/s, time and cost follow. Default: from the visible GPU's name for the H100, H200,
    A100, L40S, L40 and L4 (dense bf16, or fp32 without TF32); on the CPU 2e11 per core with
    AVX-512, else 1e11, the cores shared by the processes; else unknown, and the plan gives no
    time or cost."""
    assumed_mfu: Fraction = 0.4
    """Model FLOPs utilisation the capacity plan assumes: the share of device_peak_flops spent
    on the model's own FLOPs (6 per parameter and token, plus attention, as PaLM counts them).
    Activation checkpointing's second forward pass is extra work at the same utilisation (8
    FLOPs per parameter instead of 6)."""


Range = tuple[float, float]


class SearchSpec(Section):
    """The space and settings of `refit sweep --search tpe`: each knob is searched over its range,
    a null range keeps the recipe's value."""

    max_lr: Range | None = None
    """(low, high) of schedule.max_lr, searched on a log scale. Default: the recipe's max_lr / 3
    to 3 x max_lr (the paper continues at the base's pretraining minimum LR)."""
    min_lr_ratio: Range | None = (0.003, 0.1)
    """(low, high) of schedule.min_lr_ratio, log scale: how far the LR decays (paper: 0.01)."""
    decay: list[Literal["cosine", "linear", "wsd"]] = ["cosine"]
    """Decay shapes to choose from (one: kept fixed; paper: cosine)."""
    lr_below: Range | None = (0.05, 0.5)
    """(low, high) of the last phase's switch threshold lr_below (paper: 0.2, the QA blend at
    max_lr/5). A trial whose threshold is not above its min_lr_ratio fails validation."""
    qa_share: Range | None = (0.05, 0.3)
    """(low, high) of the QA sources' share of the last phase (paper: 0.1); the other sources
    keep their proportions in the rest."""
    startup_trials: int = Field(default=3, ge=1)
    """Trials sampled at random before TPE models the results."""
    seed: int = 0
    """Seeds the TPE sampler: the same study proposes the same trials."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stops a trial whose validation loss at a checkpoint (train.validation_tokens) is worse
    than the median of earlier trials at that step (median), or by successive halving
    (hyperband); none: every trial runs out."""

    @model_validator(mode="after")
    def _ranges_valid(self) -> SearchSpec:
        bounds = {"max_lr": (0, None), "min_lr_ratio": (0, 1), "lr_below": (0, 1), "qa_share": (0, 1)}
        problems = []
        for name, (floor, ceiling) in bounds.items():
            value = getattr(self, name)
            if value is None:
                continue
            low, high = value
            if not floor < low < high or (ceiling is not None and high > ceiling):
                limit = f" and at most {ceiling}" if ceiling is not None else ""
                problems.append(_problem((name,), f"({low}, {high}): need {floor} < low < high{limit}", list(value)))
        if not self.decay:
            problems.append(_problem(("decay",), "name at least one decay shape"))
        _raise_if(self, problems)
        return self


class SweepSpec(Section):
    budget_fraction: float = Field(default=0.25, gt=0, le=1)
    """Share of schedule.total_tokens each pilot variant trains on (`refit sweep`)."""
    select: Literal["average_accuracy", "accuracy_per_device_hour"] = "average_accuracy"
    """What the winning variant maximises: average benchmark accuracy, or its gain over the
    base per device-hour of training."""
    must_pass: list[Literal[VARIANT_GATES]] | None = None
    """Audit gates (noise-aware, thresholds from `gates`) a variant must pass to win. Default:
    every gate the audit applies that a pilot variant can be judged on (all but lineage and
    above_previous_version, which concern a published full run); a list narrows it."""
    devices: int = Field(default=1, ge=1)
    """Devices the sweep may use at once: variants train concurrently, each on
    train.num_processes devices of its own (1: one variant after another)."""
    search: SearchSpec = SearchSpec()
    """The search space of `refit sweep --search tpe --trials N` (Optuna's TPE, with pruning)."""


class Recipe(Section):
    name: Name
    """Run name: names the workdir, the Prefect flow runs and the published model."""
    description: str = ""
    """Free text for the model card."""
    workdir: RecipePath | None = execution_only(None)
    """Where every stage writes. Default: runs/<name> beside the recipe file."""
    base_model: BaseModelSpec
    """The checkpoint to continue from. Pretraining facts missing here are read from
    refit_pretraining.json in its folder when present (the demo base model writes one)."""
    tokenizer: RecipePath | None = by_content(None)
    """Tokenizer directory. Default: the base model's."""
    sources: list[SourceSpec] = Field(min_length=1)
    """Training corpora."""
    curate: CurateSpec = CurateSpec()
    """Validation, normalisation, dedupe, decontamination, held-out split."""
    tokenize: TokenizeSpec = TokenizeSpec()
    """Packing into Arrow shards."""
    mixture: MixtureSpec | None = None
    """Data phases. Default: the paper's general blend then QA blend, built from source roles."""
    schedule: ScheduleSpec
    """LR schedule and token budget."""
    train: TrainSpec = TrainSpec()
    """Optimizer, batch and checkpointing."""
    soup: SoupSpec = SoupSpec()
    """Anneal ingredients averaged into a soup. Default: one run, no soup."""
    evaluate: EvaluateSpec = EvaluateSpec()
    """Benchmarks and validation loss."""
    gates: GatesSpec = GatesSpec()
    """Audit thresholds."""
    publish: PublishSpec = PublishSpec()
    """Registry and model card."""
    cost: CostSpec = CostSpec()
    """Prices for the cost report."""
    sweep: SweepSpec = flows_only(SweepSpec())
    """The pilot sweep of the recipe's knobs before a full run."""

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: Any, info: ValidationInfo) -> Recipe:
        """Fill derived defaults, then report field errors and cross-section problems together."""
        data = _fill_defaults(data, info)
        problems = _cross_problems(data) if isinstance(data, dict) else []
        try:
            recipe = handler(data)
        except ValidationError as error:
            problems = [_problem(e["loc"], e["msg"], e.get("input")) for e in error.errors()] + problems
        _raise_if(cls.__name__, problems)
        return recipe

    @property
    def phases(self) -> list[PhaseSpec]:
        assert self.mixture is not None
        return self.mixture.phases

    @property
    def peak_lr(self) -> float:
        assert self.schedule.max_lr is not None
        return self.schedule.max_lr

    @property
    def model_name(self) -> str:
        return self.publish.model_name or self.name


def _fill_defaults(data: Any, info: ValidationInfo) -> Any:
    """Defaults that depend on other sections or the recipe's folder: workdir, base-model facts,
    max_lr, mixture, registry."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if data.get("workdir") is None and isinstance(data.get("name"), str):
        data["workdir"] = f"runs/{data['name']}"
    base = data.get("base_model")
    if isinstance(base, dict) and isinstance(base.get("path"), str):
        base = data["base_model"] = {**_pretraining_record(base["path"], info), **base}
    schedule = data.get("schedule")
    if isinstance(schedule, dict) and schedule.get("max_lr") is None and isinstance(base, dict):
        if base.get("pretraining_min_lr") is not None:
            data["schedule"] = {**schedule, "max_lr": base["pretraining_min_lr"]}
    if data.get("mixture") is None and isinstance(data.get("sources"), list):
        data["mixture"] = default_mixture(data["sources"])
    publish = data.get("publish")
    if publish is None or isinstance(publish, dict):  # so that the default registry is beside the recipe too
        data["publish"] = {"registry": PublishSpec.model_fields["registry"].default, **(publish or {})}
    return data


def _read(data: Any, *path: str | int) -> Any:
    """data[path...] or None where the raw recipe lacks it or has the wrong shape there."""
    for key in path:
        ok = isinstance(data, dict) if isinstance(key, str) else isinstance(data, list) and key < len(data)
        if not ok:
            return None
        data = data.get(key) if isinstance(data, dict) else data[key]
    return data


def _setting(data: dict, section: type[Section], name: str, field: str) -> Any:
    """A section's raw value, or the field's default when absent."""
    value = _read(data, name, field)
    return section.model_fields[field].default if value is None else _parse_count(value)


def _duplicates(items: Any, key: str, loc: Loc, what: str) -> list[InitErrorDetails]:
    names = [_read(item, key) for item in items] if isinstance(items, list) else []
    return [
        _problem((*loc, i, key), f"{what} {name!r} is used twice", name)
        for i, name in enumerate(names)
        if name is not None and name in names[:i]
    ]


def _cross_problems(data: dict) -> list[InitErrorDetails]:
    """Contradictions between sections, checked on the raw recipe so that they are reported
    even when some field fails its own validation."""
    number = (int, float)
    problems = _duplicates(data.get("sources"), "name", ("sources",), "source name")
    problems += _duplicates(_read(data, "mixture", "phases"), "name", ("mixture", "phases"), "phase name")
    problems += _duplicates(_read(data, "evaluate", "benchmarks"), "name", ("evaluate", "benchmarks"), "benchmark name")
    if _read(data, "schedule", "max_lr") is None:
        problems.append(
            _problem(
                ("schedule", "max_lr"),
                "required: set it, or give the base's final pretraining LR as base_model.pretraining_min_lr "
                f"(or in {PRETRAINING_RECORD} beside the checkpoint) to default to it",
            )
        )
    declared = data.get("sources") if isinstance(data.get("sources"), list) else []
    sources = list(dict.fromkeys(name for s in declared if isinstance(name := _read(s, "name"), str)))
    decay = _setting(data, ScheduleSpec, "schedule", "decay")
    floor = _setting(data, ScheduleSpec, "schedule", "min_lr_ratio")
    phases = _read(data, "mixture", "phases")
    previous = 1.0
    for i, phase in enumerate(phases if isinstance(phases, list) else []):
        loc = ("mixture", "phases", i, "lr_below")
        weights = _read(phase, "weights")
        for source in weights if isinstance(weights, dict) else {}:
            if source not in sources:
                problems.append(
                    _problem(
                        ("mixture", "phases", i, "weights", source),
                        f"names no declared source (declared: {', '.join(sources)})",
                        source,
                    )
                )
        threshold = _read(phase, "lr_below")
        if i == 0:
            if threshold is not None:
                problems.append(_problem(loc, "the first phase starts at step 0: remove lr_below", threshold))
            continue
        if threshold is None:
            problems.append(_problem(loc, "every phase after the first needs lr_below"))
        elif not isinstance(threshold, number):
            continue  # reported by the field itself
        elif threshold >= previous:
            problems.append(_problem(loc, f"{threshold} does not decrease (previous threshold {previous})", threshold))
        elif decay == "constant":
            problems.append(
                _problem(
                    loc, "schedule.decay is constant: the LR never falls, so this phase would never start", threshold
                )
            )
        elif isinstance(floor, number) and threshold <= floor:
            problems.append(
                _problem(
                    loc,
                    f"{threshold} is not above schedule.min_lr_ratio {floor}: the LR reaches it "
                    "at the last step at best, so the phase would get no steps",
                    threshold,
                )
            )
        previous = threshold if isinstance(threshold, number) else previous
    tokens = _setting(data, ScheduleSpec, "schedule", "total_tokens")
    per_step = _setting(data, TrainSpec, "train", "sequences_per_step")
    seq_len = _setting(data, TokenizeSpec, "tokenize", "seq_len")
    held_out = _setting(data, TrainSpec, "train", "validation_tokens")
    if isinstance(held_out, int) and isinstance(seq_len, int) and 0 < held_out < seq_len:
        problems.append(
            _problem(
                ("train", "validation_tokens"),
                f"{held_out} is less than one row of tokenize.seq_len {seq_len}: give at least {seq_len}, or 0 for "
                "no validation pass",
                held_out,
            )
        )
    problems += _soup_problems(data, phases, held_out)
    warmup = _setting(data, ScheduleSpec, "schedule", "warmup_fraction")
    counts = (tokens, per_step, seq_len, warmup)
    if all(isinstance(v, number) and math.isfinite(v) for v in counts) and min(tokens, per_step, seq_len) > 0:
        steps = int(tokens // (per_step * seq_len))
        if steps < 2 or steps <= int(warmup * steps):
            problems.append(
                _problem(
                    ("schedule", "total_tokens"),
                    f"{tokens} tokens make {steps} optimizer steps of {per_step * seq_len} tokens "
                    "(train.sequences_per_step x tokenize.seq_len): need at least 2 beyond warmup",
                    tokens,
                )
            )
    return problems


def _soup_problems(data: dict, phases: Any, held_out: Any) -> list[InitErrorDetails]:
    """Ingredients branch where a later phase starts; a greedy soup is judged on held-out loss.
    (Whether that phase starts after step 0 is known once mix has planned it: the train stage
    checks it.)"""
    problems = []
    ingredients = _setting(data, SoupSpec, "soup", "ingredients")
    if not (isinstance(ingredients, int) and ingredients >= 2):
        return problems
    if isinstance(phases, list) and len(phases) < 2:
        problems.append(
            _problem(
                ("soup", "ingredients"),
                f"{ingredients} ingredients branch off the shared run where the mixture's last phase starts, but "
                "mixture.phases has one phase: add a later phase (with lr_below), or set soup.ingredients to 1",
                ingredients,
            )
        )
    method = _setting(data, SoupSpec, "soup", "method")
    if method == "greedy" and held_out == 0:
        problems.append(
            _problem(
                ("soup", "method"),
                "greedy keeps an ingredient only if the held-out loss drops, but train.validation_tokens is 0 (no "
                "held-out rows): give train.validation_tokens, or use method uniform",
                method,
            )
        )
    return problems


def _pretraining_record(path: str, info: ValidationInfo) -> dict[str, Any]:
    """Pretraining facts recorded beside a checkpoint (refit_pretraining.json), if any."""
    record_file = Path(_resolve_path(path, info)) / PRETRAINING_RECORD
    if not record_file.is_file():
        return {}
    record = json.loads(record_file.read_text())
    keys = ("pretraining_min_lr", "pretraining_max_lr", "pretraining_tokens")
    return {key: record[key] for key in keys if key in record}


def missing_pretraining_facts(recipe: Recipe) -> str | None:
    """How to give the base model's pretraining facts that neither the recipe nor the
    checkpoint's refit_pretraining.json states; None when all are known."""
    keys = ("pretraining_min_lr", "pretraining_max_lr", "pretraining_tokens")
    missing = [key for key in keys if getattr(recipe.base_model, key) is None]
    if not missing:
        return None
    record = Path(recipe.base_model.path) / PRETRAINING_RECORD
    return (
        f"the base model's {', '.join(missing)} are unknown: they set the default schedule.max_lr (the paper "
        "starts at the final pretraining LR) and the cost comparison with retraining from scratch. Give them "
        "in the recipe:\n"
        "    base_model:\n"
        "      pretraining_min_lr: 3.0e-4     # final LR of the base's pretraining schedule\n"
        "      pretraining_max_lr: 3.0e-3     # its peak LR\n"
        "      pretraining_tokens: 1T         # tokens it was pretrained on (2e6, 2M, 1.5B and 1T all read)\n"
        f"or once for every recipe using this base, in {record}:\n"
        '    {"pretraining_min_lr": 3.0e-4, "pretraining_max_lr": 3.0e-3, "pretraining_tokens": 1000000000000}\n'
        "(model cards and papers usually state them; the values above are only examples)"
    )


def default_mixture(sources: list[Any]) -> dict[str, Any]:
    """The paper's two phases built from source roles (see MixtureSpec.phases)."""
    roles: dict[str, list[str]] = {"legacy": [], "new": [], "qa": []}
    for source in sources:
        if isinstance(source, dict) and source.get("role") in roles and isinstance(source.get("name"), str):
            roles[source["role"]].append(source["name"])
    shares = {"legacy": 0.6, "new": 0.4} if roles["legacy"] and roles["new"] else {"legacy": 1.0, "new": 1.0}
    general = {name: shares[role] / len(roles[role]) for role in ("legacy", "new") for name in roles[role]}
    phases: list[dict[str, Any]] = [{"name": "general", "weights": general or {n: 1.0 for n in roles["qa"]}}]
    if general and roles["qa"]:
        qa_blend = {name: 0.9 * weight for name, weight in general.items()}
        qa_blend.update({name: 0.1 / len(roles["qa"]) for name in roles["qa"]})
        phases.append({"name": "qa", "lr_below": 0.2, "weights": qa_blend})
    return {"phases": phases}


# ----------------------------------------------------------------------------- loading


class RecipeError(Exception):
    """Every problem of a recipe at once: (field path, YAML line or None, message)."""

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]):
        self.source = source
        self.problems = problems
        lines = [f"recipe {source} has {len(problems)} problem{'s' * (len(problems) != 1)}:"]
        lines += [f"  - {path}{f' (line {line})' if line else ''}: {message}" for path, line, message in problems]
        super().__init__("\n".join(lines))


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(recipe)"


def _yaml_line(root: yaml.Node | None, loc: Loc) -> int | None:
    """Line of the deepest YAML node along loc (the key itself for mapping entries)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; what the safetensors library itself accepts
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _json_file(path: Path) -> tuple[Any, str | None]:
    """(the JSON object in path, None), or (None, what is wrong with the file)."""
    try:
        content = json.loads(path.read_bytes())
    except OSError as error:
        return None, f"{path} cannot be read ({error.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path} is not valid JSON ({error})"
    return (content, None) if isinstance(content, dict) else (None, f"{path} is not a JSON object")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is truncated or corrupt, from its header alone (an 8-byte
    little-endian length, then that much JSON giving each tensor's byte range in the data
    after it); None when every tensor lies within the file. The tensor data is not read."""
    corrupt, size = f"{path} is truncated or corrupt:", path.stat().st_size
    if size < 8:
        return f"{corrupt} {size} bytes, too few for the 8-byte header length"
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > min(size - 8, SAFETENSORS_MAX_HEADER):
                return f"{corrupt} its header length is {length} bytes, and {size - 8} bytes follow"
            text = handle.read(length)
    except OSError as error:
        return f"{path} cannot be read ({error.strerror})"
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{corrupt} its header is not valid JSON ({error})"
    if not isinstance(header, dict):
        return f"{corrupt} its header is not a JSON object"
    data_size = size - 8 - length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if name != "__metadata__" and not (valid and 0 <= offsets[0] <= offsets[1] <= data_size):
            return f"{corrupt} tensor {name!r} has data_offsets {offsets!r}, beyond the {data_size} bytes of data"
    return None


def _checkpoint_problems(base: Path) -> list[str]:
    """What would stop the base checkpoint from loading, found without reading its weights:
    config.json that is not JSON, weights that are not safetensors (Refit loads nothing else), a
    safetensors file or shard that is missing, truncated or corrupt."""
    _, config_problem = _json_file(base / "config.json")
    problems = [config_problem] if config_problem else []
    single, index = base / "model.safetensors", base / "model.safetensors.index.json"
    if single.is_file():  # transformers prefers it to an index
        shards = [single]
    elif index.is_file():
        content, index_problem = _json_file(index)
        weight_map = (content or {}).get("weight_map")
        if index_problem or not isinstance(weight_map, dict):
            return [*problems, index_problem or f"{index} has no weight_map"]
        shards = [base / name for name in sorted(set(map(str, weight_map.values())))]
        problems += [f"{shard} is missing: {index} lists it" for shard in shards if not shard.is_file()]
        shards = [shard for shard in shards if shard.is_file()]
    else:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in base.glob(pattern))
        if pickles:
            problems.append(
                f"{base} has no safetensors weights, only {', '.join(pickles)}: Refit loads safetensors only "
                "(a pickle checkpoint can run code when loaded); if you trust it, convert it once with transformers: "
                "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
            )
        return problems
    return problems + [problem for shard in shards if (problem := _safetensors_problem(shard))]


def _file_problems(data: dict[str, Any], base_dir: Path) -> list[tuple[Loc, str]]:
    """File-system checks on the raw recipe, so they are reported beside schema problems."""

    def resolved(value: Any) -> Path | None:
        path = _absolute(value, base_dir)
        return None if path is None else Path(path)

    def entries(*path: str) -> list[tuple[int, dict]]:
        items = _read(data, *path)
        return [(i, item) for i, item in enumerate(items) if isinstance(item, dict)] if isinstance(items, list) else []

    problems: list[tuple[Loc, str]] = []
    for i, source in entries("sources"):
        for key in ("paths", "validation_paths"):
            patterns = source.get(key)
            for j, pattern in enumerate(patterns if isinstance(patterns, list) else []):
                path = resolved(pattern)
                if path is not None and not glob.glob(str(path), recursive=True):
                    problems.append((("sources", i, key, j), f"matches no file: {path}"))
    base = resolved(_read(data, "base_model", "path"))
    if base is not None and not (base / "config.json").is_file():
        problems.append((("base_model", "path"), f"no Hugging Face checkpoint (config.json) at {base}"))
    elif base is not None:
        problems += [(("base_model", "path"), problem) for problem in _checkpoint_problems(base)]
    for i, bench in entries("evaluate", "benchmarks"):
        path = resolved(bench.get("path"))
        if path is not None and not path.is_file():
            problems.append((("evaluate", "benchmarks", i, "path"), f"no such file: {path}"))
        elif path is not None:
            try:  # every item, so that a bad one stops the recipe here and not after training
                load_benchmark(path)
            except InputFileError as error:
                problems.append((("evaluate", "benchmarks", i, "path"), str(error)))
    return problems


def recipe_problem(path: str | Path, loc: Loc, message: str) -> RecipeError:
    """A problem of a valid recipe found beyond its validation (the capacity plan's), named as
    load_recipe names its own: the field and its line in the recipe file."""
    line = _yaml_line(yaml.compose(Path(path).read_text()), loc)
    return RecipeError(str(path), [(format_loc(loc), line, message)])


def load_recipe(path: str | Path, check_files: bool = True) -> Recipe:
    """Read, validate and resolve a recipe file; raise RecipeError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise RecipeError(str(path), [("(file)", None, f"cannot read: {error.strerror}")]) from None
    return parse_recipe(text, path, check_files)


def parse_recipe(text: str, path: str | Path, check_files: bool = True) -> Recipe:
    """Validate recipe text as if read from path (its relative paths are relative to path's
    folder), which need not exist; raise RecipeError listing every problem."""
    path = Path(path)
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise RecipeError(
            str(path), [("(yaml)", mark.line + 1 if mark else None, str(error).replace("\n", " "))]
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), [("(recipe)", 1, "the recipe must be a YAML mapping of sections")])
    base_dir = path.resolve().parent
    found: list[tuple[Loc, str]] = _file_problems(data, base_dir) if check_files else []
    recipe = None
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as error:
        found += [(e["loc"], e["msg"]) for e in error.errors()]
    if found or recipe is None:
        found.sort(key=lambda problem: _yaml_line(root, problem[0]) or 0)
        raise RecipeError(str(path), [(format_loc(loc), _yaml_line(root, loc), msg) for loc, msg in found])
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled, paths absolute) as YAML, saved beside outputs."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
