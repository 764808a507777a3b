"""The optimizer warm-up (train.optimizer_warmup_steps) on the demo: do steps at LR 0 that only
fill AdamW's moments help continued pretraining from a checkpoint that ships without them?

    python benchmarks/bench_optimizer_warmup.py [--warmup 10] [--seeds 0 1 2] [--total-tokens N]

For each seed (train.seed: the data order) the demo recipe trains from the demo base twice,
without and with --warmup warm-up steps, on the same scheduled data (the warm-up draws its own
sequences). Each run is measured by
  first-20 loss  the mean training loss of the schedule's first 20 steps, where a fresh AdamW's
                 first updates (each parameter moved by about the full LR) would show
  legacy loss    the final model's loss per token on the Python (legacy) validation documents,
                 scored as the evaluate stage scores them (the forgetting gate's figure)
  seconds        the train stage's wall time (the warm-up's steps included)
Prints each run, then per setting the mean over seeds with its standard error, and the paired
difference (with - without) with the standard error of the per-seed differences.
--total-tokens shortens the schedule (default: the demo's). No validation pass at checkpoints.
Run `make demo` first (it builds the base model and the demo's curated data and shards).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("LOGURU_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refit.stages.core.config import Recipe, load_recipe  # noqa: E402
from refit.stages.curate import stage as curate  # noqa: E402
from refit.stages.evaluate.scorer import ScoringTask, score_models  # noqa: E402
from refit.stages.evaluate.stage import scoring_settings  # noqa: E402
from refit.stages.mix.stage import run_mix  # noqa: E402
from refit.stages.train.stage import final_model, read_metrics, run_train  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "deployments" / "demo.yaml"
FIRST_STEPS = 20


def variant(recipe: Recipe, seed: int, warmup: int, total_tokens: int) -> Recipe:
    train = recipe.train.model_copy(
        update={"seed": seed, "optimizer_warmup_steps": warmup, "validation_tokens": 0, "checkpoint_every": 10_000}
    )
    schedule = recipe.schedule.model_copy(update={"total_tokens": total_tokens})
    return recipe.model_copy(update={"train": train, "schedule": schedule})


def legacy_loss(recipe: Recipe, demo: Path, model: Path) -> float:
    """Loss per token of model on the legacy sources' validation documents, as evaluate scores them."""
    tasks = [
        ScoringTask(source.name, "documents", docs, recipe.tokenize.seq_len)
        for source in recipe.sources
        if source.role == "legacy"
        and (docs := curate.validation_texts(demo, source.name, recipe.evaluate.validation_docs))
    ]
    tokenizer = Path(recipe.tokenizer or recipe.base_model.path)
    scored, _ = score_models({"model": model}, tokenizer, tasks, scoring_settings(recipe))
    scores = scored["model"].values()
    return float(sum(s["nll"].sum() for s in scores) / sum(s["tokens"].sum() for s in scores))


@contextmanager
def demo_workdir(recipe: Recipe, demo: Path) -> Iterator[Path]:
    """A temporary workdir holding the demo's curated data and shards, mixed for recipe."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for stage in ("curate", "tokenize"):  # train's fingerprint reads curate's marker
            shutil.copytree(demo / stage, workdir / stage)
        run_mix(recipe, workdir)
        yield workdir


def run(recipe: Recipe, demo: Path) -> dict:
    with demo_workdir(recipe, demo) as workdir:
        report = run_train(recipe, workdir)
        losses = [m["loss"] for m in read_metrics(workdir)[:FIRST_STEPS]]
        return {
            "first": statistics.fmean(losses),
            "legacy": legacy_loss(recipe, demo, final_model(workdir)),
            "seconds": report["seconds"],
            "steps": report["steps"],
        }


def mean_and_stderr(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} +- {statistics.stdev(values) / len(values) ** 0.5:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--total-tokens", type=int, default=None)
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    demo = Path(recipe.workdir)
    if not (demo / "tokenize" / "_SUCCESS.json").exists() or not (demo / "curate" / "_SUCCESS.json").exists():
        sys.exit("run `make demo` first: it builds the base model and the demo's curated data and shards")
    total_tokens = args.total_tokens or recipe.schedule.total_tokens
    print(f"base model: legacy loss {legacy_loss(recipe, demo, Path(recipe.base_model.path)):.4f}")
    results: dict[int, list[dict]] = {0: [], args.warmup: []}
    for seed in args.seeds:
        for warmup, runs in results.items():
            measured = run(variant(recipe, seed, warmup, total_tokens), demo)
            runs.append(measured)
            print(
                f"seed {seed} warm-up {warmup:3d}: first-{FIRST_STEPS} loss {measured['first']:.4f}, "
                f"legacy loss {measured['legacy']:.4f}, {measured['steps']} steps in {measured['seconds']:.0f} s",
                flush=True,
            )
    for warmup, runs in results.items():
        print(
            f"warm-up {warmup:3d} ({len(runs)} seeds): first-{FIRST_STEPS} loss "
            f"{mean_and_stderr([r['first'] for r in runs])}, "
            f"legacy loss {mean_and_stderr([r['legacy'] for r in runs])}, "
            f"{statistics.fmean(r['seconds'] for r in runs):.0f} s"
        )
    without, with_warmup = results[0], results[args.warmup]
    for key, label in (("first", f"first-{FIRST_STEPS} loss"), ("legacy", "legacy loss")):
        differences = [w[key] - c[key] for c, w in zip(without, with_warmup)]
        print(f"difference (warm-up {args.warmup} - none) {label}: {mean_and_stderr(differences)}")


if __name__ == "__main__":
    main()
