"""The training process: one per device, started by `accelerate launch` (see stages/train.py).

    accelerate launch [...] -m refit.stages.lib.train_loop <job folder>

Reads `<job folder>/job.json` (resolved recipe, fingerprint, manifest path, data root);
writes `checkpoints/step-NNNNNNNN/`, `metrics.jsonl` and `final/` beside it. Continues from
the latest complete checkpoint of the same run when there is one, else from the base model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from refit.stages.lib.config import Recipe, dump_recipe
from refit.stages.lib.lifeline import die_with_launcher
from refit.stages.lib.markers import MARKER, read_marker, write_json_atomic, write_text_atomic
from refit.stages.lib.sampler import Sampler
from refit.stages.lib.schedule import Schedule

SPIKE_WINDOW = 20


def latest_checkpoint(train_dir: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint with a done marker written by this same run (same fingerprint)."""
    complete = [
        p
        for p in sorted((train_dir / "checkpoints").glob("step-*"))
        if (marker := read_marker(p)) is not None and marker["fingerprint"] == fingerprint
    ]
    return complete[-1] if complete else None


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
    return torch.optim.AdamW(groups, lr=recipe.peak_lr, betas=recipe.train.adam_betas)


def _precision(recipe: Recipe) -> str:
    if recipe.train.precision == "fp32" or not torch.cuda.is_available():
        return "no"
    if recipe.train.precision == "bf16" or torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def save_checkpoint(acc: Accelerator, model, optimizer, state: dict, train_dir: Path, fingerprint: str) -> None:
    """Atomically write step-NNNNNNNN/ (weights, optimizer, RNG of every rank, trainer state)."""
    final = train_dir / "checkpoints" / f"step-{state['step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(torch.get_rng_state(), tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json_atomic(tmp / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)  # a same-step leftover without its marker
        tmp.rename(final)
        write_json_atomic(
            final / MARKER, {"stage": "train-checkpoint", "fingerprint": fingerprint, "step": state["step"]}
        )
    acc.wait_for_everyone()


def export_final(acc: Accelerator, model, recipe: Recipe, train_dir: Path, state: dict) -> None:
    """train/final/: the model in HF format with its tokenizer and the resolved recipe."""
    if not acc.is_main_process:
        return
    from transformers import AutoTokenizer

    tmp = train_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    acc.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(recipe.tokenizer or recipe.base_model.path).save_pretrained(tmp)
    (tmp / "refit_recipe.yaml").write_text(dump_recipe(recipe))
    write_json_atomic(tmp / "trainer_state.json", state)
    shutil.rmtree(train_dir / "final", ignore_errors=True)
    tmp.rename(train_dir / "final")


def train(train_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    job = json.loads((train_dir / "job.json").read_text())
    recipe = Recipe.model_validate(job["recipe"])
    manifest = json.loads(Path(job["manifest"]).read_text())
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_precision(recipe))
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
    source = checkpoint or Path(recipe.base_model.path)  # resuming never reloads the base
    model = AutoModelForCausalLM.from_pretrained(
        source, use_safetensors=True, dtype=torch.float32, trust_remote_code=recipe.base_model.trust_remote_code
    )
    optimizer = _optimizer(model, recipe)
    if checkpoint is not None:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        torch.set_rng_state(torch.load(checkpoint / f"rng-{acc.process_index}.pt", weights_only=True))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    else:
        if recipe.train.optimizer_state:
            optimizer.load_state_dict(torch.load(recipe.train.optimizer_state, weights_only=True))
        state = {"step": 0, "tokens": 0, "phase": 0, "switches": [], "spikes": [], "losses": []}
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
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
        for i, chunk in enumerate(chunks):
            batch = torch.from_numpy(sampler.batch(step, chunk)).to(acc.device)
            if i < len(chunks) - 1:
                with acc.no_sync(model):
                    loss = model(input_ids=batch, labels=batch).loss
                    acc.backward(loss / len(chunks))
            else:
                loss = model(input_ids=batch, labels=batch).loss
                acc.backward(loss / len(chunks))
            loss_sum += loss.detach().double().cpu()
        grad_norm = acc.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
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
                "tokens_per_s": manifest["tokens_per_step"] / (time.time() - step_started),
                "elapsed": elapsed,
            }
            with open(metrics_path, "a") as log:
                log.write(json.dumps(line) + "\n")
            acc.print(
                f"step {step + 1}/{manifest['total_steps']} loss {mean_loss:.4f} lr {lr:.2e} "
                f"phase {line['phase']} {line['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
        if state["step"] % recipe.train.checkpoint_every == 0 or state["step"] == manifest["total_steps"]:
            save_checkpoint(acc, model, optimizer, state, train_dir, job["fingerprint"])
    export_final(acc, model, recipe, train_dir, state)
    acc.wait_for_everyone()
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
        record_failure(job_dir / json.loads((job_dir / "job.json").read_text())["failure"], error)
        raise
