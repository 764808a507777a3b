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


def estimator_weights(estimator: str, counted: dict[str, dict], recipe_weights: dict[str, float], items: dict) -> dict:
    """Each benchmark's weight in the average the gain gate counts (`gates.gain_estimator`), the
    recipe's weight times: its item count (items: the accuracy over all items, as
    lm-evaluation-harness groups weigh by size), the inverse variance of its paired difference
    (precision: the most precise average of a common gain, the fixed-effect meta-analysis
    one), or 1 (equal: the macro average, the paper's "average accuracy")."""
    if estimator == "items":
        return {n: recipe_weights[n] * items[n] for n in counted}
    if estimator == "precision":  # a difference measured without error (all items alike) still has a binomial floor
        floor = {n: 0.5 / items[n] for n in counted}
        return {n: recipe_weights[n] / max(e["delta_stderr"] or 0.0, floor[n]) ** 2 for n, e in counted.items()}
    return dict(recipe_weights)


def variance_shares(entries: dict[str, dict], weights: dict[str, float]) -> dict[str, float]:
    """Each benchmark's share of the variance of the average's paired difference."""
    parts = {n: (weights[n] * (e["delta_stderr"] or 0.0)) ** 2 for n, e in entries.items()}
    total = sum(parts.values())
    return {n: part / total for n, part in parts.items()} if total > 0 else dict.fromkeys(parts, 0.0)


def judged_scores(recipe: Recipe, evaluation: dict, estimator: str | None = None) -> dict:
    """Per benchmark: the metric counted, why, its recipe weight, its weight in the average and
    both metrics; the average of the counted metric under the gain estimator (`average`, what
    the gates and the sweep use; `estimator` overrides the recipe's), the equal-weight average
    beside it (`average_equal`, the paper's), the average of each metric alone, and each
    benchmark's contribution to the average's difference and share of its variance."""
    estimator = estimator or recipe.gates.gain_estimator
    specs = {b.name: b for b in recipe.evaluate.benchmarks}
    benchmarks, counted, recipe_weights, items = {}, {}, {}, {}
    for name, entry in evaluation["benchmarks"].items():
        spec = specs.get(name)
        metric, why = chosen_metric(spec.metric if spec else None, entry.get("longest_choice_tokens"))
        recipe_weights[name] = spec.weight if spec else 1.0
        counted[name], items[name] = entry[metric], entry["items"]
        benchmarks[name] = {
            "domain": entry["domain"],
            "items": entry["items"],
            "metric": metric,
            "metric_reason": why,
            "weight": recipe_weights[name],
            **{m: entry[m] for m in METRICS},
        }
    weights = estimator_weights(estimator, counted, recipe_weights, items)
    total = sum(weights.values())
    for name in benchmarks:
        benchmarks[name]["share"] = weights[name] / total if total > 0 else 0.0
    return {
        "estimator": estimator,
        "benchmarks": benchmarks,
        "average": weighted_average(counted, weights) if benchmarks else None,
        "average_equal": weighted_average(counted, recipe_weights) if benchmarks else None,
        **{
            f"average_{m}": weighted_average({n: e[m] for n, e in evaluation["benchmarks"].items()}, weights)
            if benchmarks
            else None
            for m in METRICS
        },
        "contributions": {n: weights[n] * counted[n]["delta"] / total for n in benchmarks} if total > 0 else {},
        "variance_shares": variance_shares(counted, weights) if total > 0 else {},
    }


def previous_average(scores: dict, previous_evaluation: dict) -> dict | None:
    """A published version's weighted average under this run's metrics and weights in the
    average (its evaluation holds both metrics), over the benchmarks both share; None if none."""
    theirs = previous_evaluation.get("benchmarks") or {}
    shared = {n: b for n, b in scores["benchmarks"].items() if n in theirs and b["metric"] in theirs[n]}
    if not shared:
        return None
    return weighted_average(
        {n: theirs[n][b["metric"]] for n, b in shared.items()}, {n: b["share"] for n, b in shared.items()}
    )


def detectable_differences(recipe: Recipe) -> dict | None:
    """Before anything runs: each benchmark's items and the smallest paired difference the gates
    can tell from noise on it (`gates.noise_sigmas` standard errors), and the same for the
    average the gain gate counts. The standard error is the largest a paired difference of two
    accuracies can have on n items, both at 50% and uncorrelated: sqrt(0.5 / n); pairing and
    accuracies far from 50% make the measured one smaller. None without benchmarks."""
    sigmas, benchmarks = recipe.gates.noise_sigmas, {}
    for bench in recipe.evaluate.benchmarks:
        with open(bench.path, encoding="utf-8", errors="replace") as lines:
            items = sum(1 for line in lines if line.strip())
        stderr = math.sqrt(0.5 / items) if items else None
        benchmarks[bench.name] = {
            "items": items,
            "weight": bench.weight,
            "stderr": stderr,
            "detectable": sigmas * stderr if stderr is not None else None,
        }
    counted = {n: b for n, b in benchmarks.items() if b["weight"] > 0 and b["stderr"] is not None}
    if not counted:
        return None
    # at equal accuracies every item has the same variance: precision weights are items weights here
    by_items = recipe.gates.gain_estimator != "equal"
    weights = {n: b["weight"] * (b["items"] if by_items else 1) for n, b in counted.items()}
    stderr = math.sqrt(sum((weights[n] * b["stderr"]) ** 2 for n, b in counted.items())) / sum(weights.values())
    return {"benchmarks": benchmarks, "average": {"stderr": stderr, "detectable": sigmas * stderr}}


def underpowered(recipe: Recipe, power: dict | None) -> list[str]:
    """Benchmarks whose standard error is over 3x the regression gate's margin
    (`gates.max_benchmark_drop`): a drop that size cannot be told from noise on them."""
    limit, warnings = 3 * recipe.gates.max_benchmark_drop, []
    for name, b in (power or {}).get("benchmarks", {}).items():
        if b["stderr"] is None:
            warnings.append(f"benchmark {name} has no items: it measures nothing")
        elif b["stderr"] > limit:
            warnings.append(
                f"benchmark {name}: {b['items']} items detect only differences beyond {100 * b['detectable']:.1f} "
                f"points ({recipe.gates.noise_sigmas:g} standard errors of up to {100 * b['stderr']:.1f}), against a "
                f"regression margin of {100 * recipe.gates.max_benchmark_drop:.1f}: add items, or weigh it down "
                "(evaluate.benchmarks[].weight) so it does not blur the average"
            )
    return warnings
