"""Anneal ingredients averaged into a soup, on the demo: does the soup beat the single run and
its best ingredient, and at what compute?

    python benchmarks/bench_soup.py [--ingredients 3] [--seeds 0 1 2] [--method uniform]

For each seed (train.seed: the data order of the whole run, so also the shared prefix) the demo
recipe trains once with `soup.ingredients` ingredients: the shared run up to the switch into the
QA blend, then the last phase once per ingredient, each in an order of its own. Ingredient 0 is
exactly the single run of the same seed (no soup), so one training gives all three models
compared. The evaluate stage then scores the soup (the candidate) beside each ingredient on the
demo's benchmarks and held-out documents, paired on the same items; the audit's rule
(`audit.soup.judged_soup`) picks the best ingredient by the counted average. Per seed it prints
the counted average of the soup, the single run and the best ingredient, the soup's paired
differences from them (standard errors over the items), and the held-out loss per token on the
new-domain and the legacy sources; then the mean of each difference over the seeds with the
standard error of the per-seed differences, and the tokens trained: the soup pays the shared
prefix once and the anneal once per ingredient. The safety probes are off (they score base
and soup only, and cost time). Run `make demo` first (base model, curated data and shards).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("LOGURU_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_optimizer_warmup import demo_workdir  # noqa: E402  (this folder is on sys.path as the script's)

from refit.stages.audit.soup import judged_soup  # noqa: E402
from refit.stages.core.config import Recipe, load_recipe  # noqa: E402
from refit.stages.core.scores import judged_scores, weighted_average  # noqa: E402
from refit.stages.evaluate.stage import run_evaluate  # noqa: E402
from refit.stages.train.stage import run_train  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "deployments" / "demo.yaml"


def variant(recipe: Recipe, seed: int, ingredients: int, method: str) -> Recipe:
    train = recipe.train.model_copy(update={"seed": seed})
    soup = recipe.soup.model_copy(update={"ingredients": ingredients, "method": method})
    safety = recipe.evaluate.safety.model_copy(update={"probes": [], "generation": False})
    evaluate = recipe.evaluate.model_copy(update={"safety": safety})
    return recipe.model_copy(update={"train": train, "soup": soup, "evaluate": evaluate})


def counted_against(recipe: Recipe, evaluation: dict, index: int) -> dict:
    """The soup against ingredient `index` on the counted average (soup minus it, paired)."""
    scores = judged_scores(recipe, evaluation)
    soup = evaluation["soup"]["benchmarks"]
    entries = {name: soup[name][b["metric"]]["vs_ingredients"][index] for name, b in scores["benchmarks"].items()}
    return weighted_average(entries, {name: b["share"] for name, b in scores["benchmarks"].items()})


def losses_by_role(evaluation: dict, role: str) -> dict:
    """Loss per token of the soup and each ingredient on the held-out documents of the sources
    with this role (token-weighted over them)."""
    sources = [s for s, v in evaluation["validation"].items() if v["role"] == role]
    soup = evaluation["soup"]["validation"]
    count = len(evaluation["soup"]["ingredients"])
    tokens = {s: evaluation["validation"][s]["tokens"] for s in sources}
    total = sum(tokens.values())

    def mean(values: dict[str, float]) -> float:
        return sum(tokens[s] * values[s] for s in sources) / total

    return {
        "soup": mean({s: soup[s]["vs_mean"]["candidate"] for s in sources}),
        "ingredients": [mean({s: soup[s]["vs_ingredients"][i]["base"] for s in sources}) for i in range(count)],
    }


def run(recipe: Recipe, demo: Path) -> dict:
    with demo_workdir(recipe, demo) as workdir:
        trained = run_train(recipe, workdir)
        evaluation = run_evaluate(recipe, workdir)
        judged = judged_soup(recipe, evaluation)
        return {
            "judged": judged,
            "vs_single": counted_against(recipe, evaluation, 0),
            "new": losses_by_role(evaluation, "new"),
            "legacy": losses_by_role(evaluation, "legacy"),
            "tokens": trained["tokens"],
            "shared_tokens": trained["soup"]["shared_tokens"],
            "anneal_tokens": [i["anneal_tokens"] for i in trained["ingredients"]],
            "seconds": trained["seconds"],
        }


def mean_and_stderr(values: list[float]) -> str:
    spread = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):+.4f} +- {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ingredients", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--method", choices=("uniform", "greedy"), default="uniform")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    demo = Path(recipe.workdir)
    if not (demo / "tokenize" / "_SUCCESS.json").exists() or not (demo / "curate" / "_SUCCESS.json").exists():
        sys.exit("run `make demo` first: it builds the base model and the demo's curated data and shards")
    rows = []
    for seed in args.seeds:
        measured = run(variant(recipe, seed, args.ingredients, args.method), demo)
        rows.append(measured)
        judged, single = measured["judged"], measured["vs_single"]
        best = judged["best"]
        print(
            f"seed {seed}: counted average soup {single['candidate']:.4f}, single run {single['base']:.4f}, "
            f"best ingredient ({best}) {judged['average']['vs_best']['base']:.4f}; soup - single "
            f"{single['delta']:+.4f} +- {single['delta_stderr']:.4f}, soup - best "
            f"{judged['average']['vs_best']['delta']:+.4f} +- {judged['average']['vs_best']['delta_stderr']:.4f}",
            flush=True,
        )
        for role in ("new", "legacy"):
            losses = measured[role]
            print(
                f"  {role} loss per token: soup {losses['soup']:.4f}, single run {losses['ingredients'][0]:.4f}, "
                f"ingredients {', '.join(f'{x:.4f}' for x in losses['ingredients'])}"
            )
        print(
            f"  tokens: {measured['tokens']:,} (shared prefix {measured['shared_tokens']:,} once, anneals "
            f"{' + '.join(f'{t:,}' for t in measured['anneal_tokens'])}); the single run "
            f"{measured['shared_tokens'] + measured['anneal_tokens'][0]:,}; train {measured['seconds']:.0f} s",
            flush=True,
        )
    print(f"over {len(rows)} seeds (mean +- standard error of the per-seed values):")
    print(f"  counted average, soup - single run: {mean_and_stderr([r['vs_single']['delta'] for r in rows])}")
    vs_best = [r["judged"]["average"]["vs_best"]["delta"] for r in rows]
    print(f"  counted average, soup - best ingredient: {mean_and_stderr(vs_best)}")
    vs_mean = [r["judged"]["average"]["vs_mean"]["delta"] for r in rows]
    print(f"  counted average, soup - mean of the ingredients: {mean_and_stderr(vs_mean)}")
    for role in ("new", "legacy"):
        single = [r[role]["soup"] - r[role]["ingredients"][0] for r in rows]
        best = [r[role]["soup"] - min(r[role]["ingredients"]) for r in rows]
        print(f"  {role} loss per token, soup - single run: {mean_and_stderr(single)}")
        print(f"  {role} loss per token, soup - lowest ingredient: {mean_and_stderr(best)}")
    ratio = statistics.fmean(r["tokens"] / (r["shared_tokens"] + r["anneal_tokens"][0]) for r in rows)
    print(f"  compute: the soup trained {ratio:.2f}x the single run's tokens")


if __name__ == "__main__":
    main()
