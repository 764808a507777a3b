"""Training throughput of the train stage against a bare torch loop, and model FLOPs utilisation.

    python benchmarks/bench_train.py [--steps 40] [--peak-flops F]

Both sides train the demo base model on the demo's packed sequences with the demo recipe's
micro batch, sequences per step, sequence length and threads, for the same number of steps:
  baseline  a bare loop: forward, backward, grad accumulation, clipping, AdamW step; run
            before and after the stage and averaged, since this machine's speed drifts
  refit     `run_train` through `accelerate launch` (sampler, LR schedule and switch,
            metrics, checkpoints), timed from its own per-step log after 3 warm-up steps
Prints tokens/s of each, the ratio (target >= 0.95x) and MFU = 6 x parameters x tokens/s
over the peak: --peak-flops, else a measured fp32 matmul peak of this machine (so on a CPU
the MFU is against what torch's matmul reaches here, not a datasheet).
Then the stage with 2 processes (gloo on a CPU), strategy ddp against fsdp (FSDP2), on the
same steps: tokens/s of each and the ratio fsdp/ddp (sharding costs collectives that a model
this small cannot hide; it pays off when the model does not fit on one device).
Run `make demo` first (it builds the base model and the demo's shards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LOGURU_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from refit.stages.core.config import load_recipe  # noqa: E402
from refit.stages.mix.manifest import Manifest  # noqa: E402
from refit.stages.mix.stage import run_mix  # noqa: E402
from refit.stages.train.sampler import Sampler  # noqa: E402
from refit.stages.train.stage import run_train  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "deployments" / "demo.yaml"
WARMUP = 3


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def bare_loop(recipe, manifest: Manifest, workdir: Path, steps: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // recipe.train.num_processes))
    model = AutoModelForCausalLM.from_pretrained(recipe.base_model.path, use_safetensors=True, dtype=torch.float32)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.peak_lr, betas=recipe.train.adam_betas, weight_decay=recipe.train.weight_decay
    )
    sampler = Sampler(manifest, workdir)
    per_step, micro = manifest.sequences_per_step, recipe.train.micro_batch_size
    chunks = [range(i, min(i + micro, per_step)) for i in range(0, per_step, micro)]
    batches = [[torch.from_numpy(sampler.batch(step, c)) for c in chunks] for step in range(steps)]
    for step, micro_batches in enumerate(batches):
        if step == WARMUP:
            start = time.perf_counter()
        for batch in micro_batches:
            (model(input_ids=batch, labels=batch).loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - WARMUP) * manifest.tokens_per_step / (time.perf_counter() - start), model.num_parameters()


def stage_rate(log: Path, tokens_per_step: int) -> float:
    """Tokens/s of the train stage from its own per-step log, after the warm-up steps."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return (len(lines) - WARMUP) * tokens_per_step / (lines[-1]["elapsed"] - lines[WARMUP - 1]["elapsed"])


def copy_data_stages(demo: Path, workdir: Path) -> None:
    """The demo's curated documents and shards: train reads both (its validation rows, the shards)."""
    for stage in ("curate", "tokenize"):
        shutil.copytree(demo / stage, workdir / stage)


def two_process_strategies(recipe, demo: Path) -> dict[str, float]:
    rates = {}
    for strategy in ("ddp", "fsdp"):
        train = recipe.train.model_copy(update={"num_processes": 2, "strategy": strategy})
        variant = recipe.model_copy(update={"train": train})
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            copy_data_stages(demo, workdir)
            manifest = run_mix(variant, workdir)
            run_train(variant, workdir)
            rates[strategy] = stage_rate(workdir / "train" / "metrics.jsonl", manifest.tokens_per_step)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--peak-flops", type=float, default=None)
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    demo = Path(recipe.workdir)
    if not (demo / "mix" / "_SUCCESS.json").exists():
        sys.exit("run `make demo` first: it builds the base model and the demo's shards")
    tokens = args.steps * recipe.train.sequences_per_step * recipe.tokenize.seq_len
    recipe = recipe.model_copy(update={"schedule": recipe.schedule.model_copy(update={"total_tokens": tokens})})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        copy_data_stages(demo, workdir)
        manifest = run_mix(recipe, workdir)
        for source in manifest.sources.values():  # the manifest's shard paths are relative to the workdir
            assert all((workdir / s.path).is_file() for s in source.shards)
        # the baseline runs before and after the stage and is averaged: this machine drifts
        before, parameters = bare_loop(recipe, manifest, workdir, args.steps)
        run_train(recipe, workdir)
        after, _ = bare_loop(recipe, manifest, workdir, args.steps)
        baseline = (before + after) / 2
        ours = stage_rate(workdir / "train" / "metrics.jsonl", manifest.tokens_per_step)
    strategies = two_process_strategies(recipe, demo)
    peak = args.peak_flops or matmul_peak()
    source = "given" if args.peak_flops else "measured fp32 matmul"
    print(
        f"model {parameters / 1e6:.2f}M parameters, {args.steps} steps x {manifest.tokens_per_step} tokens, "
        f"{recipe.train.num_processes} process(es), {torch.get_num_threads()} threads"
    )
    print(
        f"baseline bare torch loop  {baseline:9.0f} tokens/s   MFU {6 * parameters * baseline / peak:6.1%}"
        f"   (before {before:.0f}, after {after:.0f})"
    )
    print(f"refit train stage         {ours:9.0f} tokens/s   MFU {6 * parameters * ours / peak:6.1%}")
    print(f"ratio refit/baseline: {ours / baseline:.2f}x (target >= 0.95x); peak {peak / 1e9:.1f} GFLOP/s ({source})")
    for strategy, rate in strategies.items():
        print(f"refit train stage, 2 processes, {strategy:4s} {rate:9.0f} tokens/s")
    print(f"ratio fsdp/ddp with 2 processes: {strategies['fsdp'] / strategies['ddp']:.2f}x")


if __name__ == "__main__":
    main()
