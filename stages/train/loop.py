"""The training process: one per device, started by `accelerate launch` (see stages/train/stage.py).

    accelerate launch [...] -m refit.stages.train.loop <job folder> [<ingredient>]

Reads `<job folder>/job.json` (resolved recipe, fingerprint, manifest path, data root);
writes `checkpoints/step-NNNNNNNN/` (`step-00000000-warmup-NNNNNNNN/` during the optimizer
warm-up), `metrics.jsonl` (with the validation loss on `validation.arrow`, when the job has
one, at every checkpoint) and `final/` beside it. Continues from the latest complete
checkpoint of the same run when there is one, else from the base model.

A job with a soup (job["soup"], recipe section `soup`) is launched once per anneal ingredient,
the second argument naming it (see `Ingredient`): ingredient 0 is the single run, which also
keeps a checkpoint where the last phase starts (the branch point, never pruned); ingredient
i >= 1 trains the last phase again from that checkpoint in a folder of its own, reading the
phase in an order of its own (sampler.py), with checkpoints no other ingredient resumes.

`train()` reads top to bottom: `set_up` (the model, resumed or from the base, and the data),
the optimizer warm-up's steps at LR 0 (`warm_up_optimizer`), then per step `switch_phase`,
`optimizer_step` and `record_step`, at each checkpoint `validate` then `save_checkpoint`,
and `finish` (the export). How the processes share the
model (`train.strategy`) is strategy.py's. Either way checkpoints are
torch.distributed.checkpoint (DCP) folders written by every process, so a run resumes on
another number of processes (or the other strategy): DCP reshards on load, and the data
order does not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from refit.stages.core.config import Recipe, dump_recipe
from refit.stages.core.disk import full_disk_cause, full_disk_line
from refit.stages.core.lifeline import die_with_launcher
from refit.stages.core.markers import (
    MARKER,
    damaged_outputs,
    file_sha256,
    read_marker,
    write_json_atomic,
    write_text_atomic,
)
from refit.stages.core.remote_code import drop_foreign_code_references
from refit.stages.core.schedule import Schedule, phase_at
from refit.stages.core.shards import read_shard
from refit.stages.mix.manifest import Manifest, load_manifest
from refit.stages.train.heartbeat import Heartbeat
from refit.stages.train.sampler import Sampler
from refit.stages.train.strategy import Strategy, strategy_for

EXPORT_SHARD_BYTES = 5 * 2**30  # safetensors shard size of the Hugging Face export


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; not norms and biases
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()  # one kernel per step on GPUs; the CPU keeps the foreach path
    return torch.optim.AdamW(groups, lr=recipe.peak_lr, betas=recipe.train.adam_betas, fused=fused)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: object) -> list:
    """obj from every process, in rank order ([obj] when there is no process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, found generically: modules of the classes it names in
    `_no_split_modules` (the units Hugging Face never splits across devices, e.g.
    LlamaDecoderLayer, GPT2Block)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder-layer class in _no_split_modules ({sorted(names)}), so "
            f"train.strategy fsdp and train.compile cannot find its layers; use train.strategy ddp without compile"
        )
    return layers


def prepare_model(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """Activation checkpointing, compilation, then the strategy's wrapping (under fsdp, FSDP2
    sharding of each decoder layer and of the root)."""
    spec = recipe.train
    strategy = strategy_for(recipe)
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.compile:
            # From transformers 5.25 the `kernels` package is live: its use_kernelized_func wraps
            # e.g. LlamaAttention.forward in a set/reset of a module-level context variable.
            # Inside the checkpointed layer dynamo refuses that mutation ("HOP: Unsafe side
            # effect") and runs the whole layer eagerly. The set/reset cancels out, so skipping
            # its replay in the backward's recompute changes nothing.
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = decoder_layers(model) if spec.compile or strategy.shards_layers else []
    if spec.compile:
        for layer in layers:
            layer.compile()
    return strategy.wrap(model, layers, recipe, device)


def validation_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean token loss of the held-out rows (all tokens, as the training loss counts them),
    under no_grad in eval mode, train mode restored after. Process r scores rows r, r + N, ...
    and the sums are added over the processes, so the value does not depend on their number.
    Every process runs as many forward passes (under fsdp each one gathers the weights)."""
    from torch.distributed.fsdp import FSDPModule

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = rows[rank::world]
    passes = math.ceil(math.ceil(len(rows) / world) / batch_size)
    predicted = rows.shape[1] - 1  # tokens predicted per row
    totals = torch.zeros(2, dtype=torch.float64)  # summed loss, tokens
    model.eval()
    with torch.no_grad():
        for i in range(passes):
            batch = mine[i * batch_size : (i + 1) * batch_size]
            counted = len(batch)
            batch = (batch if counted else rows[:1]).to(device)  # nothing left here: a pass that counts for nothing
            loss = model(input_ids=batch, labels=batch).loss
            totals += torch.tensor([loss.double().item() * counted * predicted, counted * predicted])
    model.train()
    if isinstance(model, FSDPModule):  # the root stays gathered after a forward pass without backward
        model.reshard()
    if dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def compile_summary() -> dict:
    """What torch.compile made of this process's decoder layers: graphs compiled, and each
    graph break's reason with its count (the code around a break runs eagerly)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": dict(counters["graph_break"])}


def complete_checkpoints(train_dir: Path, fingerprint: str) -> list[Path]:
    """Checkpoints with a done marker written by this same run (same fingerprint), oldest first."""
    return [
        p
        for p in sorted((train_dir / "checkpoints").glob("step-*"))
        if (marker := read_marker(p)) is not None
        and marker["fingerprint"] == fingerprint
        and not damaged_outputs(p, marker)  # a truncated checkpoint: resume from the one before
    ]


def latest_checkpoint(train_dir: Path, fingerprint: str) -> Path | None:
    complete = complete_checkpoints(train_dir, fingerprint)
    return complete[-1] if complete else None


def save_checkpoint(
    model: torch.nn.Module,
    optimizer,
    state: dict,
    train_dir: Path,
    fingerprint: str,
    keep: int | None,
    spare: str | None = None,
) -> None:
    """Write step-NNNNNNNN/ from every process: weights and optimizer state as DCP shards, each
    process's RNG state, the trainer state. Staged in `.tmp`, renamed, then the marker, which
    lists the sha256 of each file, hashed once here by the process that wrote it. Of the
    complete checkpoints, all but the newest `keep` are deleted, never the one named `spare`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = train_dir / "checkpoints" / checkpoint_name(state)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    torch.save(torch.get_rng_state(), tmp / f"rng-{rank}.pt")
    mine = [f"rng-{rank}.pt", *(p.name for p in tmp.glob(f"__{rank}_*.distcp"))]
    if rank == 0:
        write_json_atomic(tmp / "trainer_state.json", state)
        mine += [".metadata", "trainer_state.json"]
    digests = {
        name: digest for part in _gather({n: file_sha256(tmp / n) for n in mine}) for name, digest in part.items()
    }
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # a same-step leftover without its marker
        tmp.rename(final)
        sizes = {name: (final / name).stat().st_size for name in digests}
        write_json_atomic(
            final / MARKER,
            {
                "stage": "train-checkpoint",
                "fingerprint": fingerprint,
                "step": state["step"],
                "outputs": digests,
                "sizes": sizes,
            },
        )
        for old in complete_checkpoints(train_dir, fingerprint)[: -keep if keep else 0]:
            if old.name != spare:
                shutil.rmtree(old)
    _barrier()


def checkpoint_name(state: dict) -> str:
    """step-NNNNNNNN after N steps of the schedule; before its first, during the optimizer
    warm-up, step-00000000-warmup-NNNNNNNN after N warm-up steps (which sorts before step 1)."""
    name = f"step-{state['step']:08d}"
    return name if state["step"] else f"{name}-warmup-{state['optimizer_warmup_steps']:08d}"


def load_checkpoint(model: torch.nn.Module, optimizer, checkpoint: Path, weights: bool = True) -> None:
    """Load a checkpoint's optimizer state (and weights) into this run's layout, whatever the
    number of processes or the strategy that wrote it: DCP reads the pieces each process needs."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    wanted = {"model": model_state, "optimizer": optimizer_state} if weights else {"optimizer": optimizer_state}
    dcp.load(wanted, checkpoint_id=checkpoint)
    if weights:
        set_model_state_dict(model, wanted["model"])
    set_optimizer_state_dict(model, optimizer, wanted["optimizer"])


def skipped_on_export(model: torch.nn.Module) -> set[str]:
    """State-dict names the export leaves out, as save_pretrained does: tied copies (the
    parameter is written once, under its first name) and those the class asks not to save."""
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return tied | set(getattr(model, "_keys_to_ignore_on_save", None) or ())


class SafetensorsShards:
    """Tensors added one at a time to Hugging Face's safetensors layout: shards of at most
    shard_bytes (a larger tensor alone), one held in memory at a time, written under temporary
    names and renamed by `close` to those save_pretrained gives (model.safetensors, or
    model-0000i-of-0000n.safetensors and model.safetensors.index.json)."""

    def __init__(self, out_dir: Path, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.written: list[tuple[Path, list[str]]] = []
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.shard and self.size + tensor.nbytes > self.shard_bytes:
            self._flush()
        self.shard[name] = tensor
        self.size += tensor.nbytes
        self.total += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f"shard-{len(self.written)}.tmp"
        save_file(self.shard, path, metadata={"format": "pt"})
        self.written.append((path, list(self.shard)))
        self.shard, self.size = {}, 0

    def close(self) -> dict[str, str]:
        """Write the last shard (and the index when there are several); {file name: sha256}."""
        self._flush()
        if len(self.written) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors" for i in range(len(self.written))]
            index = {"metadata": {"total_size": self.total}, "weight_map": {}}
            for file, (_, keys) in zip(names, self.written):
                index["weight_map"].update(dict.fromkeys(keys, file))
            write_json_atomic(self.out_dir / "model.safetensors.index.json", index)
        digests = {}
        for file, (path, _) in zip(names, self.written):
            path.rename(self.out_dir / file)
            digests[file] = file_sha256(self.out_dir / file)
        return digests


def export_weights(model: torch.nn.Module, out_dir: Path, shard_bytes: int = EXPORT_SHARD_BYTES) -> dict[str, str]:
    """The weights in Hugging Face's safetensors layout, streamed: one tensor is gathered at a
    time (a collective under fsdp, so every process calls this) and the main process holds at
    most one shard of the export besides its own share of the model. Tied copies are written
    once, as save_pretrained does. Returns {file name: sha256} of what it wrote (main process)."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    skipped = skipped_on_export(model)
    shards = SafetensorsShards(out_dir, shard_bytes)
    for name, tensor in model.state_dict().items():
        if name in skipped:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if main:
            shards.add(name, full.detach().to("cpu").contiguous())
    if not main:
        return {}
    digests = shards.close()
    model.config.save_pretrained(out_dir)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    return digests


def export_final(model: torch.nn.Module, recipe: Recipe, out_dir: Path, state: dict, digests_file: str) -> None:
    """out_dir/final/: the model in HF format with its tokenizer and the resolved recipe; the
    sha256 of the weights, hashed as they were written, go to digests_file beside it."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    tmp = out_dir / "final.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    digests = export_weights(model, tmp)
    if not main:
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(recipe.tokenizer or recipe.base_model.path).save_pretrained(tmp)
    for name, references in drop_foreign_code_references(tmp).items():  # the built-in class was trained
        print(f"train: the export's {name} names code it does not hold, auto_map dropped: {references}", flush=True)
    (tmp / "refit_recipe.yaml").write_text(dump_recipe(recipe))
    write_json_atomic(tmp / "trainer_state.json", state)
    write_json_atomic(out_dir / digests_file, digests)
    shutil.rmtree(out_dir / "final", ignore_errors=True)
    tmp.rename(out_dir / "final")


def out_of_memory(error: torch.OutOfMemoryError, where: str, recipe: Recipe) -> torch.OutOfMemoryError:
    """The error to raise instead: the step (`where`), the memory asked for and what to change."""
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]i?B)", str(error))
    held = ""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        held = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB of {total / 2**30:.1f} GiB already in use"
    hints = [f"lower train.micro_batch_size (now {recipe.train.micro_batch_size})"]
    if not recipe.train.activation_checkpointing:
        hints.append("set train.activation_checkpointing: true")
    hints.append(strategy_for(recipe).out_of_memory_hint(recipe))
    return torch.OutOfMemoryError(
        f"out of GPU memory at {where}: asked for {asked.group(1) if asked else 'more than was free'}{held}. "
        f"To fit: {'; or '.join(hints)}"
    )


class PeerLost(RuntimeError):
    """Another training process fell silent (see heartbeat.py)."""


def _stop_for(failure: Path):
    """What a process does when another falls silent: record why, naming it, and exit at once
    (its launcher then stops the processes of its machine)."""

    def stop(reason: str) -> None:
        record_failure(failure, PeerLost(reason))
        print(reason, file=sys.stderr, flush=True)
        os._exit(1)

    return stop


@dataclass(frozen=True)
class Ingredient:
    """What one launch trains, and where: the single run, or one anneal ingredient of a soup,
    laid out by the stage in job["soup"] (stage.py, `ingredient_folders`)."""

    index: int  # 0: the single run (with a soup, the one that trains the shared prefix)
    train_dir: Path  # its checkpoints/ and metrics.jsonl
    export_dir: Path  # its final/ and the sha256 of its weights
    fingerprint: str  # of its checkpoints: one ingredient never resumes another's
    branch_step: int | None  # with a soup, the step the ingredients branch off at (the last phase's start)
    shared: Ingredient | None = None  # for ingredients 1..: ingredient 0, whose branch checkpoint they start from

    @classmethod
    def of(cls, job_dir: Path, job: dict, index: int) -> Ingredient:
        soup = job.get("soup")
        if soup is None:
            if index:
                raise ValueError(f"ingredient {index}: the job in {job_dir} trains no soup, only ingredient 0")
            return cls(0, job_dir, job_dir, job["fingerprint"], None)
        own = soup["ingredients"][index]
        shared = cls.of(job_dir, job, 0) if index else None
        folders = job_dir / own["train_dir"], job_dir / own["export_dir"]
        return cls(index, *folders, own["fingerprint"], soup["branch_step"], shared)

    @property
    def branch_checkpoint(self) -> str | None:
        """The name of the checkpoint at the branch point (ingredient 0 writes and keeps it)."""
        return None if self.branch_step is None else checkpoint_name({"step": self.branch_step})

    def start(self) -> Path | None:
        """Where a first launch starts: ingredient 0 from the base, the others from the shared
        run's complete checkpoint at the branch point."""
        if self.shared is None:
            return None
        for checkpoint in complete_checkpoints(self.shared.train_dir, self.shared.fingerprint):
            if checkpoint.name == self.branch_checkpoint:
                return checkpoint
        raise RuntimeError(
            f"ingredient {self.index} starts from the shared run's checkpoint {self.branch_checkpoint} (where the "
            f"last phase starts), but {self.shared.train_dir / 'checkpoints'} holds no complete one: deleted or "
            "damaged since ingredient 0 finished; rerun the stage with --force to train the shared run again"
        )


@dataclass
class Run:
    """One training process's run, as `set_up` leaves it for the steps."""

    job_dir: Path  # job.json, the held-out rows, the failure file
    ingredient: Ingredient  # what this launch trains: its own folders
    job: dict
    recipe: Recipe
    strategy: Strategy
    manifest: Manifest
    schedule: Schedule  # the manifest's
    acc: Accelerator
    heartbeat: Heartbeat
    model: torch.nn.Module  # what the steps run (wrapped by accelerate under ddp)
    optimizer: torch.optim.Optimizer
    raw_model: torch.nn.Module  # unwrapped: what checkpoints, validation and the export read
    raw_optimizer: torch.optim.Optimizer
    sampler: Sampler
    held_out: torch.Tensor | None  # the validation rows, when the job has them
    micro_batches: list[range]  # this process's sequences of a step, one range per forward pass
    state: dict  # what checkpoints keep: step, optimizer_warmup_steps, tokens, phase, switches
    started: float = field(default_factory=time.time)

    @property
    def train_dir(self) -> Path:
        return self.ingredient.train_dir

    @property
    def branch_step(self) -> int | None:
        """With a soup, the step where ingredients branch off (ingredient 0 checkpoints it)."""
        return self.ingredient.branch_step


def train(job_dir: Path, ingredient: int = 0) -> None:
    run = set_up(job_dir, ingredient)
    for warmup_step in range(run.state["optimizer_warmup_steps"], run.recipe.train.optimizer_warmup_steps):
        warm_up_optimizer(run, warmup_step)
    total_steps = run.schedule.total_steps
    for step in range(run.state["step"], total_steps):
        step_started = time.time()
        run.heartbeat.step = step
        lr = run.schedule.lr(step)
        phase = switch_phase(run, step, lr)
        loss, grad_norm = optimizer_step(run, step, lr)
        record_step(run.state, step, run.manifest.tokens_per_step)
        step_seconds = time.time() - step_started
        done = run.state["step"]  # a checkpoint at the interval, at the end, and where ingredients branch off
        checkpoint_due = done % run.recipe.train.checkpoint_every == 0 or done in (total_steps, run.branch_step)
        validation = validate(run) if checkpoint_due and run.held_out is not None else {}
        if run.acc.is_main_process:
            line = {"step": step, "tokens": run.state["tokens"], "lr": lr, "loss": loss, "grad_norm": grad_norm}
            line |= {"phase": run.manifest.phases[phase].name, "sources": run.sampler.phase_counts(step)}
            log_metrics(run, line | validation, step_seconds)
        if checkpoint_due:
            checkpoint(run)
    finish(run)


def warm_up_optimizer(run: Run, warmup_step: int) -> None:
    """One step of the optimizer warm-up (train.optimizer_warmup_steps): a whole step at LR 0
    on the warm-up's own draw of the first phase (sampler.py), so AdamW's moments gather the
    gradients while the weights stay bitwise as they are (its decoupled weight decay is scaled
    by the LR too). AdamW counts these steps, so its bias correction (dividing by 1 - beta^t)
    matches the gradients the moments hold: the first scheduled update is not scaled up as a
    fresh optimizer's first step would be. Logged (`optimizer_warmup_step` instead of `step`)
    and checkpointed at the usual interval; no step of the schedule."""
    started = time.time()
    loss, grad_norm = optimizer_step(run, warmup_step, 0.0, warmup=True)
    run.state["optimizer_warmup_steps"] = warmup_step + 1
    if run.acc.is_main_process:
        line = {"optimizer_warmup_step": warmup_step, "lr": 0.0, "loss": loss, "grad_norm": grad_norm}
        line |= {"phase": run.manifest.phases[run.sampler.warmup_phase].name}
        line |= {"sources": run.sampler.phase_counts(warmup_step, warmup=True)}
        log_metrics(run, line, time.time() - started)
    if run.state["optimizer_warmup_steps"] % run.recipe.train.checkpoint_every == 0:
        checkpoint(run)


def checkpoint(run: Run) -> None:
    """Save the run's checkpoint now (the branch point's is never pruned)."""
    keep, ingredient = run.recipe.train.keep_checkpoints, run.ingredient
    save_checkpoint(
        run.raw_model,
        run.raw_optimizer,
        run.state,
        ingredient.train_dir,
        ingredient.fingerprint,
        keep,
        spare=ingredient.branch_checkpoint,
    )


def log_metrics(run: Run, line: dict, step_seconds: float) -> None:
    """Append a step's line to metrics.jsonl (main process), with its throughput and the time so far."""
    line |= {"tokens_per_s": run.manifest.tokens_per_step / step_seconds, "elapsed": time.time() - run.started}
    with open(run.train_dir / "metrics.jsonl", "a") as log:
        log.write(json.dumps(line) + "\n")


def set_up(job_dir: Path, index: int = 0) -> Run:
    """The job's recipe and manifest, the model (resumed, or from the base) wrapped for the
    strategy, and this process's share of the data, for ingredient `index` of the job."""
    job = json.loads((job_dir / "job.json").read_text())
    ingredient = Ingredient.of(job_dir, job, index)
    recipe = Recipe.model_validate(job["recipe"])
    strategy = strategy_for(recipe)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=strategy.autocast(recipe))
    stop = _stop_for(job_dir / job["failure"])
    heartbeat = Heartbeat(
        ingredient.train_dir, acc.process_index, acc.num_processes, recipe.train.heartbeat_timeout, stop
    ).start()
    manifest = load_manifest(Path(job["manifest"]))
    torch.manual_seed(recipe.train.seed)
    raw_model = prepare_model(base_model(recipe), recipe, acc.device)
    raw_optimizer = _optimizer(raw_model, recipe)
    state = resume(raw_model, raw_optimizer, ingredient, recipe, strategy)
    model, optimizer = strategy.prepare(acc, raw_model, raw_optimizer)
    model.train()
    held_out = None
    if job["validation"]:  # the rows run_train packed (a small file: read whole)
        held_out = torch.from_numpy(read_shard(job_dir / job["validation"]).astype("int64"))
    sampler = Sampler(manifest, Path(job["data_root"]), recipe.train.optimizer_warmup_steps, ingredient=index)
    if acc.is_main_process:
        ingredient.train_dir.mkdir(parents=True, exist_ok=True)
        keep_metrics_before(ingredient.train_dir / "metrics.jsonl", state)
    if index:
        acc.print(f"ingredient {index}: the last phase again, on from step {state['step']}", flush=True)
    mine = range(acc.process_index, manifest.sequences_per_step, acc.num_processes)  # this process's sequences
    micro = recipe.train.micro_batch_size
    return Run(
        job_dir=job_dir,
        ingredient=ingredient,
        job=job,
        recipe=recipe,
        strategy=strategy,
        manifest=manifest,
        schedule=manifest.lr_schedule(),
        acc=acc,
        heartbeat=heartbeat,
        model=model,
        optimizer=optimizer,
        raw_model=raw_model,
        raw_optimizer=raw_optimizer,
        sampler=sampler,
        held_out=held_out,
        micro_batches=[mine[i : i + micro] for i in range(0, len(mine), micro)],
        state=state,
    )


def base_model(recipe: Recipe) -> torch.nn.Module:
    """The base in fp32: the architecture, and the weights unless a checkpoint overwrites them.
    Attention is transformers' default, SDPA where the architecture supports it, else eager: asking
    for SDPA is refused for Gemma2, whose attention logits are soft-capped, which SDPA cannot do."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        recipe.base_model.path,
        use_safetensors=True,
        use_kernels=False,  # transformers >= 5.25 would swap in Hub kernels (other numerics, fetched code)
        dtype=torch.float32,
        trust_remote_code=recipe.base_model.trust_remote_code,
    )


def resume(model: torch.nn.Module, optimizer, ingredient: Ingredient, recipe: Recipe, strategy: Strategy) -> dict:
    """The trainer state to go on from. The latest complete checkpoint of this run (of this
    ingredient), else where an ingredient starts (the shared run's checkpoint at the branch
    point), is loaded with this process's RNG state; else train.optimizer_state, if given."""
    checkpoint = latest_checkpoint(ingredient.train_dir, ingredient.fingerprint) or ingredient.start()
    if checkpoint is not None:
        load_checkpoint(model, optimizer, checkpoint)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng = checkpoint / f"rng-{rank}.pt"  # absent for a process the run did not have before
        torch.set_rng_state(torch.load(rng if rng.exists() else checkpoint / "rng-0.pt", weights_only=True))
        return json.loads((checkpoint / "trainer_state.json").read_text())
    warm = recipe.train.optimizer_state
    if warm and Path(warm).is_dir():  # a Refit checkpoint: its optimizer state only
        load_checkpoint(model, optimizer, Path(warm), weights=False)
    elif warm:
        strategy.load_optimizer_file(optimizer, warm)
    return {"step": 0, "optimizer_warmup_steps": 0, "tokens": 0, "phase": 0, "switches": []}


def keep_metrics_before(metrics: Path, state: dict) -> None:
    """A resumed run rewrites the log from its checkpoint on: the steps, and the optimizer
    warm-up's steps, that state has not done yet are dropped."""

    def done(line: dict) -> bool:
        if "optimizer_warmup_step" in line:
            return line["optimizer_warmup_step"] < state["optimizer_warmup_steps"]
        return line["step"] < state["step"]

    lines = metrics.read_text().splitlines() if metrics.exists() else []
    write_text_atomic(metrics, "".join(line + "\n" for line in lines if done(json.loads(line))))


def switch_phase(run: Run, step: int, lr: float) -> int:
    """The step's phase; a switch is recorded in the trainer state and announced. It must
    fall where mix planned it, or the manifest was planned for another schedule."""
    phases, state = run.manifest.phases, run.state
    phase = phase_at(run.schedule, [p.lr_below for p in phases], step)
    if phase != state["phase"]:
        name, planned = phases[phase].name, phases[phase].start_step
        if step != planned:
            raise RuntimeError(
                f"the LR trigger of phase {name} fired at step {step}, "
                f"but the manifest planned step {planned}: the manifest is stale, rerun mix"
            )
        state["phase"] = phase
        state["switches"].append({"step": step, "phase": name, "lr": lr})
        run.acc.print(
            f"switch: step {step}, LR {lr:.3e} <= {phases[phase].lr_below} x max_lr: data now {name}", flush=True
        )
    return phase


def step_label(step: int, warmup: bool) -> str:
    return f"optimizer warm-up step {step}" if warmup else f"step {step}"


def optimizer_step(run: Run, step: int, lr: float, warmup: bool = False) -> tuple[float, float]:
    """One step of the optimizer at lr (a step of the optimizer warm-up's, or of the schedule's);
    the loss (the mean over every process) and the gradient norm. Either one non-finite stops
    training before the weights change."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = accumulate_gradients(run, step, warmup)
    grad_norm = run.strategy.clip_gradients(run.model, run.recipe.train.grad_clip)
    loss = run.acc.reduce((loss_sum / len(run.micro_batches)).to(run.acc.device), reduction="mean").item()
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        last = latest_checkpoint(run.train_dir, run.ingredient.fingerprint)
        raise FloatingPointError(
            f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at {step_label(step, warmup)} "
            f"(LR {lr:.3e}); training stopped, last good checkpoint kept: "
            f"{last.name if last else 'none yet'}. Lower schedule.max_lr or check the data."
        )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def accumulate_gradients(run: Run, step: int, warmup: bool) -> torch.Tensor:
    """Forward and backward passes over this process's micro-batches of the step (of the
    optimizer warm-up's, or of the schedule's), each loss scaled so that the gradients add up
    to the step's mean; the sum of their losses."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    try:
        for i, sequences in enumerate(run.micro_batches):
            batch = torch.from_numpy(run.sampler.batch(step, sequences, warmup)).to(run.acc.device)
            last = i == len(run.micro_batches) - 1  # gradients are reduced across processes once, here
            with run.strategy.micro_batch(run.acc, run.model, reduce=last):
                loss = run.model(input_ids=batch, labels=batch).loss
                run.acc.backward(loss / len(run.micro_batches))
            loss_sum += loss.detach().double().cpu()
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error, step_label(step, warmup), run.recipe) from None
    return loss_sum


def record_step(state: dict, step: int, tokens_per_step: int) -> None:
    """The trainer state after `step` (loss spikes are the audit's to find, in the metrics log)."""
    state["step"], state["tokens"] = step + 1, (step + 1) * tokens_per_step


def validate(run: Run) -> dict:
    """The held-out loss of the weights now, those the checkpoint about to be written saves."""
    started = time.time()
    loss = validation_loss(run.raw_model, run.held_out, run.recipe.train.micro_batch_size, run.acc.device)
    return {"val_loss": loss, "val_seconds": time.time() - started}


def finish(run: Run) -> None:
    """final/, once every step is done, from every process (the export gathers the weights)."""
    if run.recipe.train.compile:  # in the final trainer state and the report: did compilation take?
        run.state["compiled"] = compile_summary()
        run.acc.print(
            f"compile: {run.state['compiled']['graphs']} graphs, graph breaks: {run.state['compiled']['graph_breaks']}"
        )
    export_final(run.raw_model, run.recipe, run.ingredient.export_dir, run.state, run.job["final_sha256"])
    run.acc.wait_for_everyone()
    run.heartbeat.finish()
    run.acc.end_training()


def record_failure(path: Path, error: BaseException) -> None:
    """Leave why training stopped at path, for run_train (the launcher's exit code cannot say).
    Only the first failing rank's reason is kept: the others mostly fail because it did. The
    file appears whole (a hard link to a complete file: atomic, and refused if it exists)."""
    mine = path.with_name(f"{path.name}.{os.getpid()}")
    mine.write_text(f"{type(error).__name__}: {error}\n")
    try:
        os.link(mine, path)
    except FileExistsError:
        pass
    finally:
        mine.unlink()


if __name__ == "__main__":
    die_with_launcher()  # no training process outlives its launcher (lifeline.py)
    try:
        train(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    except Exception as error:
        job_dir = Path(sys.argv[1])
        full = full_disk_cause(error)
        try:
            record_failure(job_dir / json.loads((job_dir / "job.json").read_text())["failure"], full or error)
        except OSError:  # the disk is full: the line below is what run_train reads instead
            pass
        if full is None:
            raise
        print(f"train: {full_disk_line(str(full))}", file=sys.stderr, flush=True)  # a traceback says no more
        sys.exit(1)
