"""What the audit counts: each benchmark's metric (acc or acc_norm) and weight, and the
weighted averages that the gain gate, the sweep ranking and every report use.

The evaluate stage measures both metrics for every benchmark, and the longest choice in
tokens; the choice of metric and the weights are the recipe's (`evaluate.benchmarks[].metric`
and `.weight`), so changing them reruns the audit, not the scoring. One function here
decides, so the gates, `refit sweep`, `refit report`, report.md and the model card agree.

Every per-item figure (a benchmark's accuracy, a safety probe's share) is reported as
`paired_comparison` makes it: both models' means with standard errors, and the paired
difference with its own standard error (same items for both models).
"""

from __future__ import annotations

import math

import numpy as np

from refit.stages.core.config import Recipe

METRICS = ("acc", "acc_norm")
SIDES = ("base", "candidate", "delta")


def mean_stderr(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as the harness
    reports); None where undefined (no values, or one), so reports stay valid JSON."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else None
    return mean, (float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None)


def paired_comparison(base: np.ndarray, candidate: np.ndarray) -> dict:
    """Both means with standard errors, and the paired difference (per item, candidate minus
    base) with its standard error: {"base", "base_stderr", "candidate", ..., "delta_stderr"}."""
    (b, b_se), (c, c_se), (d, d_se) = mean_stderr(base), mean_stderr(candidate), mean_stderr(candidate - base)
    return {"base": b, "base_stderr": b_se, "candidate": c, "candidate_stderr": c_se, "delta": d, "delta_stderr": d_se}


def chosen_metric(metric: str | None, longest_choice_tokens: int | None) -> tuple[str, str]:
    """(metric, why): the recipe's, else acc_norm when some choice has several tokens."""
    if metric is not None:
        return metric, "set by the recipe"
    if longest_choice_tokens is None:
        return "acc_norm", "default (choice lengths not recorded by this evaluation)"
    if longest_choice_tokens > 1:
        return "acc_norm", f"default: choices of up to {longest_choice_tokens} tokens"
    return "acc", "default: every choice is one token"


def weighted_average(entries: dict[str, dict], weights: dict[str, float]) -> dict | None:
    """Base, candidate and paired difference of the weighted mean of per-benchmark figures
    ({"base", "base_stderr", ...} each), with the standard error of that mean (benchmarks
    independent: sqrt(sum w^2 se^2) / sum w). None without weight."""
    total = sum(weights[name] for name in entries)
    if total <= 0:
        return None
    average: dict = {}
    for side in SIDES:
        average[side] = sum(weights[n] * e[side] for n, e in entries.items()) / total
        errors = [(weights[n], e.get(f"{side}_stderr")) for n, e in entries.items() if weights[n] > 0]
        average[f"{side}_stderr"] = (
            None
            if any(err is None for _, err in errors)
            else math.sqrt(sum((w * err) ** 2 for w, err in errors)) / total
        )
    return average


def judged_scores(recipe: Recipe, evaluation: dict) -> dict:
    """Per benchmark: the metric counted, why, its weight and both metrics; the weighted average
    of the counted metric (`average`, what the gates and the sweep use) and of each metric alone,
    and each benchmark's contribution to the average's difference."""
    specs = {b.name: b for b in recipe.evaluate.benchmarks}
    benchmarks, counted, weights = {}, {}, {}
    for name, entry in evaluation["benchmarks"].items():
        spec = specs.get(name)
        metric, why = chosen_metric(spec.metric if spec else None, entry.get("longest_choice_tokens"))
        weights[name] = spec.weight if spec else 1.0
        counted[name] = entry[metric]
        benchmarks[name] = {
            "domain": entry["domain"],
            "items": entry["items"],
            "metric": metric,
            "metric_reason": why,
            "weight": weights[name],
            **{m: entry[m] for m in METRICS},
        }
    total = sum(weights.values())
    return {
        "benchmarks": benchmarks,
        "average": weighted_average(counted, weights) if benchmarks else None,
        **{
            f"average_{m}": weighted_average({n: e[m] for n, e in evaluation["benchmarks"].items()}, weights)
            if benchmarks
            else None
            for m in METRICS
        },
        "contributions": {n: weights[n] * counted[n]["delta"] / total for n in benchmarks} if total > 0 else {},
    }


def previous_average(scores: dict, previous_evaluation: dict) -> dict | None:
    """A published version's weighted average under this run's metrics and weights (its
    evaluation holds both metrics), over the benchmarks both share; None if none."""
    theirs = previous_evaluation.get("benchmarks") or {}
    shared = {n: b for n, b in scores["benchmarks"].items() if n in theirs and b["metric"] in theirs[n]}
    if not shared:
        return None
    return weighted_average(
        {n: theirs[n][b["metric"]] for n, b in shared.items()}, {n: b["weight"] for n, b in shared.items()}
    )


def metric_label(scores: dict) -> str:
    """'acc_norm' when every counted benchmark uses it, else 'acc/acc_norm per benchmark'."""
    metrics = {b["metric"] for b in scores["benchmarks"].values() if b["weight"] > 0}
    return metrics.pop() if len(metrics) == 1 else "acc or acc_norm per benchmark"
