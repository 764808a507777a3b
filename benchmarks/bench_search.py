"""TPE search against the grid on the demo: the best average accuracy each finds, and the
device-seconds each spends to reach within noise of the grid's best.

    python benchmarks/bench_search.py [--budget-fraction 0.25] [--trials 6]
        [--grid mixture.phases.1.lr_below=0.5,0.2,0.1 --grid schedule.max_lr=3e-3,1e-3]

Both run on the demo recipe at the same budget, each in its own workdir under
runs/bench-search/ (grid/ and tpe/), with the same two baselines. The safety probes are
off (runs/bench-search/recipe.yaml): this compares accuracy against compute, and the
probes would take most of each variant's time. "Within noise" is the
sweep's own rule: a value v reaches the grid's best b when b - v <= gates.noise_sigmas x
the unpaired standard error of the two. Device-seconds count training (seconds x
processes) in the order the variants ran, pruned TPE trials included. Prints a table and
writes runs/bench-search/results.json. Run `make demo` first (it builds the base model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("LOGURU_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refit.flows.pilot.variants import set_field  # noqa: E402
from refit.flows.search import search  # noqa: E402
from refit.flows.sweep import sweep  # noqa: E402
from refit.stages.core.config import dump_recipe, load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "deployments" / "demo.yaml"


def _device_seconds(row: dict) -> float:
    return row.get("device_seconds", (row.get("device_hours") or 0) * 3600)


def reach(rows: list[dict], target: dict, sigmas: float) -> tuple[float | None, float]:
    """Device-seconds spent until a row is within noise of target (None if none is), and in all."""
    spent, reached = 0.0, None
    for row in rows:
        spent += _device_seconds(row)
        if reached is None and row["status"] == "ok" and row["score"] is not None:
            error = math.hypot(row["score_stderr"] or 0, target["score_stderr"] or 0)
            if target["score"] - row["score"] <= sigmas * error:
                reached = spent
    return reached, spent


def accuracy_only_recipe(out: Path) -> Path:
    """The demo recipe, resolved, without the safety probes (bias sets and generation)."""
    recipe = load_recipe(RECIPE)
    data = recipe.model_dump(mode="json")
    set_field(data, "evaluate.safety.probes", [])
    set_field(data, "evaluate.safety.generation", False)
    path = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_recipe(recipe.model_validate(data)))
    return path


def best(rows: list[dict]) -> dict:
    return max((r for r in rows if r["status"] == "ok" and r["score"] is not None), key=lambda r: r["score"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument(
        "--grid", action="append", help="default: 3 switch thresholds x 2 LRs, as in docs/sweep-and-search.md"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-search")
    args = parser.parse_args()
    grid = args.grid or ["mixture.phases.1.lr_below=0.5,0.2,0.1", "schedule.max_lr=3e-3,1e-3"]
    recipe = accuracy_only_recipe(args.out)
    sigmas = load_recipe(recipe).gates.noise_sigmas
    grid_summary = sweep(
        recipe=str(recipe), grid=grid, budget_fraction=args.budget_fraction, workdir=str(args.out / "grid")
    )
    tpe_summary = search(
        recipe=str(recipe), trials=args.trials, budget_fraction=args.budget_fraction, workdir=str(args.out / "tpe")
    )
    grid_rows = [r for r in grid_summary["rows"] if r["kind"] == "grid"]
    tpe_rows = [r for r in tpe_summary["rows"] if r["variant"].startswith("tpe-")]
    target = best(grid_rows)
    results = {"budget_fraction": args.budget_fraction, "grid": grid, "trials": args.trials, "noise_sigmas": sigmas}
    for name, rows in (("grid", grid_rows), ("tpe", tpe_rows)):
        top = best(rows)
        reached, spent = reach(rows, target, sigmas)
        results[name] = {
            "variants": len(rows),
            "pruned": sum(r["status"] == "pruned" for r in rows),
            "best_variant": top["variant"],
            "best_settings": top["description"],
            "best_average_acc": top["score"],
            "best_stderr": top["score_stderr"],
            "device_seconds_to_reach_grid_best": reached,
            "device_seconds_total": spent,
        }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"budget fraction {args.budget_fraction}, grid {grid}, {args.trials} TPE trials")
    print("| search | variants (pruned) | best avg acc | best settings | device-s to grid best | device-s total |")
    print("|---|---|---|---|---|---|")
    for name in ("grid", "tpe"):
        r = results[name]
        to_best = (
            "not reached"
            if r["device_seconds_to_reach_grid_best"] is None
            else f"{r['device_seconds_to_reach_grid_best']:.0f}"
        )
        print(
            f"| {name} | {r['variants']} ({r['pruned']}) | {100 * r['best_average_acc']:.1f} +- "
            f"{100 * r['best_stderr']:.1f} | {r['best_settings']} | {to_best} | {r['device_seconds_total']:.0f} |"
        )


if __name__ == "__main__":
    main()
