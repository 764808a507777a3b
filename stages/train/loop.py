"""The training process: one per device, started by `accelerate launch` (see stages/train/stage.py).

    accelerate launch [...] -m refit.stages.train.loop <job folder>

Reads `<job folder>/job.json` (resolved recipe, fingerprint, manifest path, data root);
writes `checkpoints/step-NNNNNNNN/`, `metrics.jsonl` (with the validation loss on
`validation.arrow`, when the job has one, at every checkpoint) and `final/` beside it. Continues from
the latest complete checkpoint of the same run when there is one, else from the base model.

`train.strategy` ddp wraps the model in DistributedDataParallel (through accelerate); fsdp
applies FSDP2's `fully_shard` to each decoder layer and to the root. Either way checkpoints
are torch.distributed.checkpoint (DCP) folders written by every process, so a run resumes
on another number of processes (or the other strategy): DCP reshards on load, and the data
order does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
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
from refit.stages.core.schedule import Schedule
from refit.stages.core.shards import read_shard
from refit.stages.train.heartbeat import Heartbeat
from refit.stages.train.sampler import Sampler

SPIKE_WINDOW = 20
EXPORT_SHARD_BYTES = 5 * 2**30  # safetensors shard size of the Hugging Face export


def phase_at(manifest: dict, schedule: Schedule, step: int) -> int:
    """The last phase whose trigger has fired: after warmup, LR <= its lr_below x max_lr.
    Thresholds decrease and the LR does not rise after warmup, so each fires once, in order."""
    phase = 0
    if step >= schedule.warmup_steps:
        for i, p in enumerate(manifest["phases"][1:], start=1):
            if schedule.lr(step) <= p["lr_below"] * schedule.max_lr:
                phase = i
    return phase


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; not norms and biases
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()  # one kernel per step on GPUs; the CPU keeps the foreach path
    return torch.optim.AdamW(groups, lr=recipe.peak_lr, betas=recipe.train.adam_betas, fused=fused)


def _precision(recipe: Recipe) -> str:
    if recipe.train.precision == "fp32" or not torch.cuda.is_available():
        return "no"
    if recipe.train.precision == "bf16" or torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


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
    """Activation checkpointing, compilation and, under fsdp, FSDP2 sharding of each decoder
    layer and of the root (bf16 parameters and compute, fp32 gradient reduction under bf16)."""
    spec = recipe.train
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.compile:
            # From transformers 5.25 the `kernels` package is live: its use_kernelized_func wraps
            # e.g. LlamaAttention.forward in a set/reset of a module-level context variable.
            # Inside the checkpointed layer dynamo refuses that mutation ("HOP: Unsafe side
            # effect") and runs the whole layer eagerly. The set/reset cancels out, so skipping
            # its replay in the backward's recompute changes nothing.
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = decoder_layers(model) if spec.compile or spec.strategy == "fsdp" else []
    if spec.compile:
        for layer in layers:
            layer.compile()
    if spec.strategy == "ddp":
        return model.to(device)  # before the optimizer is built: fused AdamW steps on the device
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process: accelerate starts no group, FSDP2 needs one
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = _precision(recipe) == "bf16"
    # bf16 parameters and compute, fp32 gradient reduction; the sharded fp32 master weights stay
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for layer in layers:  # fully_shard also moves the shards to the mesh's device
        fully_shard(layer, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    fully_shard(model, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    return model


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
    model: torch.nn.Module, optimizer, state: dict, train_dir: Path, fingerprint: str, keep: int | None
) -> None:
    """Write step-NNNNNNNN/ from every process: weights and optimizer state as DCP shards, each
    process's RNG state, the trainer state. Staged in `.tmp`, renamed, then the marker, which
    lists the sha256 of each file, hashed once here by the process that wrote it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = train_dir / "checkpoints" / f"step-{state['step']:08d}"
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
            shutil.rmtree(old)
    _barrier()


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


def export_weights(model: torch.nn.Module, out_dir: Path, shard_bytes: int = EXPORT_SHARD_BYTES) -> dict[str, str]:
    """The weights in Hugging Face's safetensors layout, streamed: one tensor is gathered at a
    time (a collective under fsdp, so every process calls this) and the main process holds at
    most one shard of the export besides its own share of the model. Tied copies are written
    once, as save_pretrained does. Returns {file name: sha256} of what it wrote (main process)."""
    from safetensors.torch import save_file

    main = not dist.is_initialized() or dist.get_rank() == 0
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    skipped = tied | set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out_dir / f"shard-{len(written)}.tmp"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in model.state_dict().items():
        if name in skipped:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if not main:
            continue
        if shard and size + full.nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = full.detach().to("cpu").contiguous()
        size += full.nbytes
        total += full.nbytes
    if not main:
        return {}
    flush()
    if len(written) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
        index = {"metadata": {"total_size": total}, "weight_map": {}}
        for file, (_, keys) in zip(names, written):
            index["weight_map"].update(dict.fromkeys(keys, file))
        write_json_atomic(out_dir / "model.safetensors.index.json", index)
    digests = {}
    for file, (path, _) in zip(names, written):
        path.rename(out_dir / file)
        digests[file] = file_sha256(out_dir / file)
    model.config.save_pretrained(out_dir)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    return digests


def export_final(model: torch.nn.Module, recipe: Recipe, train_dir: Path, state: dict, digests_file: str) -> None:
    """final/: the model in HF format with its tokenizer and the resolved recipe; the sha256 of
    the weights, hashed as they were written, go to digests_file beside it."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    tmp = train_dir / "final.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
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
    write_json_atomic(train_dir / digests_file, digests)
    shutil.rmtree(train_dir / "final", ignore_errors=True)
    tmp.rename(train_dir / "final")


def out_of_memory(error: torch.OutOfMemoryError, step: int, recipe: Recipe) -> torch.OutOfMemoryError:
    """The error to raise instead: the step, the memory asked for and what to change."""
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]i?B)", str(error))
    held = ""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        held = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB of {total / 2**30:.1f} GiB already in use"
    hints = [f"lower train.micro_batch_size (now {recipe.train.micro_batch_size})"]
    if not recipe.train.activation_checkpointing:
        hints.append("set train.activation_checkpointing: true")
    hints.append(
        "set train.strategy: fsdp to shard the model and optimizer over the processes"
        if recipe.train.strategy == "ddp"
        else f"shard over more processes (train.num_processes, now {recipe.train.num_processes})"
    )
    return torch.OutOfMemoryError(
        f"out of GPU memory at step {step}: asked for {asked.group(1) if asked else 'more than was free'}{held}. "
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


def _autocast(recipe: Recipe) -> str:
    """accelerate's autocast, for ddp; fsdp casts through its mixed-precision policy instead."""
    return "no" if recipe.train.strategy == "fsdp" else _precision(recipe)


def train(train_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    job = json.loads((train_dir / "job.json").read_text())
    recipe = Recipe.model_validate(job["recipe"])
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_autocast(recipe))
    heartbeat = Heartbeat(
        train_dir,
        acc.process_index,
        acc.num_processes,
        recipe.train.heartbeat_timeout,
        _stop_for(train_dir / job["failure"]),
    ).start()
    manifest = json.loads(Path(job["manifest"]).read_text())
    torch.manual_seed(recipe.train.seed)
    s = manifest["schedule"]
    schedule = Schedule(
        max_lr=s["max_lr"],
        total_steps=manifest["total_steps"],
        min_lr_ratio=s["min_lr_ratio"],
        warmup_steps=s["warmup_steps"],
        decay=s["decay"],
        wsd_decay_steps=s["wsd_decay_steps"],
    )
    checkpoint = latest_checkpoint(train_dir, job["fingerprint"])
    fsdp = recipe.train.strategy == "fsdp"
    # the base gives the architecture; a checkpoint, when resuming, then overwrites every weight
    model = AutoModelForCausalLM.from_pretrained(
        recipe.base_model.path,
        use_safetensors=True,
        use_kernels=False,  # transformers >= 5.25 would swap in Hub kernels (other numerics, fetched code)
        dtype=torch.float32,
        trust_remote_code=recipe.base_model.trust_remote_code,
        **({"attn_implementation": "sdpa"} if torch.cuda.is_available() else {}),
    )
    model = prepare_model(model, recipe, acc.device)
    optimizer = _optimizer(model, recipe)
    raw_model, raw_optimizer = model, optimizer  # what checkpoints and the export read, unwrapped
    rank = dist.get_rank() if dist.is_initialized() else 0
    if checkpoint is not None:
        load_checkpoint(model, optimizer, checkpoint)
        rng = checkpoint / f"rng-{rank}.pt"  # absent for a process the run did not have before
        torch.set_rng_state(torch.load(rng if rng.exists() else checkpoint / "rng-0.pt", weights_only=True))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    else:
        warm = recipe.train.optimizer_state
        if warm and Path(warm).is_dir():
            load_checkpoint(model, optimizer, Path(warm), weights=False)
        elif warm and fsdp:
            raise ValueError(
                f"train.optimizer_state: {warm} is a torch.save file, which only strategy ddp loads; "
                f"give a Refit checkpoint folder (train/checkpoints/step-NNNNNNNN/) instead"
            )
        elif warm:
            optimizer.load_state_dict(torch.load(warm, weights_only=True))
        state = {"step": 0, "tokens": 0, "phase": 0, "switches": [], "spikes": [], "losses": []}
    if not fsdp:
        model, optimizer = acc.prepare(model, optimizer)
    model.train()
    held_out = None
    if job["validation"]:  # the rows run_train packed (a small file: read whole)
        held_out = torch.from_numpy(read_shard(train_dir / job["validation"]).astype("int64"))
    sampler = Sampler(manifest, Path(job["data_root"]))
    metrics_path = train_dir / "metrics.jsonl"
    if acc.is_main_process:  # a resumed run rewrites the log from its checkpoint on
        kept = [
            line
            for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
            if json.loads(line)["step"] < state["step"]
        ]
        write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))
    per_rank = range(acc.process_index, manifest["sequences_per_step"], acc.num_processes)
    micro = recipe.train.micro_batch_size
    chunks = [per_rank[i : i + micro] for i in range(0, len(per_rank), micro)]
    started = time.time()
    for step in range(state["step"], manifest["total_steps"]):
        step_started = time.time()
        heartbeat.step = step
        lr = schedule.lr(step)
        phase = phase_at(manifest, schedule, step)
        if phase != state["phase"]:
            expected = manifest["phases"][phase]["start_step"]
            if step != expected:
                raise RuntimeError(
                    f"the LR trigger of phase {manifest['phases'][phase]['name']} fired at step {step}, "
                    f"but the manifest planned step {expected}: the manifest is stale, rerun mix"
                )
            state["phase"] = phase
            state["switches"].append({"step": step, "phase": manifest["phases"][phase]["name"], "lr": lr})
            acc.print(
                f"switch: step {step}, LR {lr:.3e} <= {manifest['phases'][phase]['lr_below']} x max_lr: "
                f"data now {manifest['phases'][phase]['name']}",
                flush=True,
            )
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        try:
            for i, chunk in enumerate(chunks):
                batch = torch.from_numpy(sampler.batch(step, chunk)).to(acc.device)
                last_chunk = i == len(chunks) - 1  # gradients are reduced across processes once, here
                if fsdp:
                    model.set_requires_gradient_sync(last_chunk)
                with contextlib.nullcontext() if last_chunk or fsdp else acc.no_sync(model):
                    loss = model(input_ids=batch, labels=batch).loss
                    acc.backward(loss / len(chunks))
                loss_sum += loss.detach().double().cpu()
        except torch.OutOfMemoryError as error:
            raise out_of_memory(error, step, recipe) from None
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        if isinstance(grad_norm, DTensor):  # fsdp: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        mean_loss = acc.reduce((loss_sum / len(chunks)).to(acc.device), reduction="mean").item()
        if not math.isfinite(mean_loss) or not math.isfinite(float(grad_norm)):
            last = latest_checkpoint(train_dir, job["fingerprint"])
            raise FloatingPointError(
                f"non-finite loss ({mean_loss}) or gradient norm ({float(grad_norm)}) at step {step} "
                f"(LR {lr:.3e}); training stopped, last good checkpoint kept: "
                f"{last.name if last else 'none yet'}. Lower schedule.max_lr or check the data."
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = state["losses"][-SPIKE_WINDOW:]
        if (
            len(recent) == SPIKE_WINDOW
            and mean_loss > recipe.gates.loss_spike_factor * sorted(recent)[SPIKE_WINDOW // 2]
        ):
            state["spikes"].append({"step": step, "loss": mean_loss})
        state["losses"] = recent + [mean_loss]
        state["step"], state["tokens"] = step + 1, (step + 1) * manifest["tokens_per_step"]
        step_seconds = time.time() - step_started
        checkpoint_due = state["step"] % recipe.train.checkpoint_every == 0 or state["step"] == manifest["total_steps"]
        validation = {}
        if checkpoint_due and held_out is not None:  # the weights the checkpoint saves, scored before it is written
            scoring_started = time.time()
            loss = validation_loss(raw_model, held_out, micro, acc.device)
            validation = {"val_loss": loss, "val_seconds": time.time() - scoring_started}
        if acc.is_main_process:
            elapsed = time.time() - started
            line = {
                "step": step,
                "tokens": state["tokens"],
                "lr": lr,
                "loss": mean_loss,
                "grad_norm": float(grad_norm),
                "phase": manifest["phases"][phase]["name"],
                "sources": sampler.phase_counts(step),
                "tokens_per_s": manifest["tokens_per_step"] / step_seconds,
                "elapsed": elapsed,
                **validation,
            }
            with open(metrics_path, "a") as log:
                log.write(json.dumps(line) + "\n")
        if checkpoint_due:
            save_checkpoint(
                raw_model, raw_optimizer, state, train_dir, job["fingerprint"], recipe.train.keep_checkpoints
            )
    if recipe.train.compile:  # in the final trainer state and the report: did compilation take?
        state["compiled"] = compile_summary()
        acc.print(f"compile: {state['compiled']['graphs']} graphs, graph breaks: {state['compiled']['graph_breaks']}")
    export_final(raw_model, recipe, train_dir, state, job["final_sha256"])
    acc.wait_for_everyone()
    heartbeat.finish()
    acc.end_training()


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
        train(Path(sys.argv[1]))
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
