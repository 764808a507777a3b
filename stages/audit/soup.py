"""The soup against its ingredients, as counted (#26): which ingredient is the best and by how
much the soup beats it, and the mean of the ingredients, on the metrics and weights the audit
counts (stages/core/scores.py).

The evaluate stage measures, for both metrics of every benchmark and for every validation
source, the soup against each ingredient and against the per-item mean of the ingredients,
paired (its report's `soup` section). Which ingredient is the best depends on what is counted:
the highest average of the counted metrics under the gain gate's weights (`judged_scores`'
shares), ties going to the lower mean validation loss over the sources; without a counted
benchmark, the lowest mean validation loss. `judged_soup` decides it from the evaluate report
and the recipe, for the audit and through it the model card: changing a metric or a weight
reruns the audit, not the scoring. The best is picked on the very items it is then compared on: soup against the best
leans towards the best ingredient (its lead is partly luck), soup against the mean does not.
"""

from __future__ import annotations

import math

from refit.stages.core.config import Recipe
from refit.stages.core.scores import judged_scores, weighted_average


def _mean_loss(soup: dict, index: int) -> float:
    """Ingredient `index`'s mean validation loss over the sources (inf without any)."""
    losses = [v["vs_ingredients"][index]["base"] for v in soup["validation"].values()]
    return sum(losses) / len(losses) if losses else math.inf


def judged_soup(recipe: Recipe, evaluation: dict) -> dict | None:
    """The soup against the best ingredient and the mean of the ingredients, per benchmark on
    its counted metric, on the counted average and per validation source; each comparison as
    `paired_comparison` makes it ("base": the ingredient or the mean, "candidate": the soup,
    "delta": soup minus it, with standard errors). None for an evaluation without a soup."""
    soup = evaluation.get("soup")
    if not soup:
        return None
    scores = judged_scores(recipe, evaluation)
    count = len(soup["ingredients"])
    counted = {name: b["metric"] for name, b in scores["benchmarks"].items()}
    shares = {name: b["share"] for name, b in scores["benchmarks"].items()}
    raw = {name: soup["benchmarks"][name][metric] for name, metric in counted.items()}
    averages = [
        weighted_average({name: r["vs_ingredients"][i] for name, r in raw.items()}, shares) if raw else None
        for i in range(count)
    ]
    mean_losses = [_mean_loss(soup, i) for i in range(count)]
    if all(a is not None for a in averages) and count:
        best = min(range(count), key=lambda i: (-averages[i]["base"], mean_losses[i], i))
        best_by = "the highest counted average (ties: the lower mean validation loss)"
    elif soup["validation"]:
        best = min(range(count), key=lambda i: (mean_losses[i], i))
        best_by = "the lowest mean validation loss over the sources (no counted benchmark)"
    else:
        return None  # nothing measured to compare on
    return {
        "method": soup["method"],
        "branch_step": soup["branch_step"],
        "kept": soup["kept"],
        "estimator": scores["estimator"],
        "best": soup["ingredients"][best]["index"],
        "best_by": best_by,
        "ingredients": [
            {
                "index": ingredient["index"],
                "kept": ingredient["index"] in soup["kept"],
                "average": averages[i]["base"] if averages[i] else None,
                "average_stderr": averages[i]["base_stderr"] if averages[i] else None,
                "validation": {source: v["vs_ingredients"][i]["base"] for source, v in soup["validation"].items()},
            }
            for i, ingredient in enumerate(soup["ingredients"])
        ],
        "average": {
            "vs_best": averages[best],
            "vs_mean": weighted_average({name: r["vs_mean"] for name, r in raw.items()}, shares) if raw else None,
        },
        "benchmarks": {
            name: {
                "metric": counted[name],
                "share": shares[name],
                "ingredients": [c["base"] for c in r["vs_ingredients"]],
                "vs_best": r["vs_ingredients"][best],
                "vs_mean": r["vs_mean"],
            }
            for name, r in raw.items()
        },
        "validation": {
            source: {
                "role": evaluation["validation"][source]["role"],
                "ingredients": [c["base"] for c in v["vs_ingredients"]],
                "vs_best": v["vs_ingredients"][best],
                "vs_mean": v["vs_mean"],
            }
            for source, v in soup["validation"].items()
        },
    }
