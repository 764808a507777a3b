"""The audit's gates: each returns {name, passed, value, threshold, reason} (`gate`), all are
evaluated and all reported. Every gate on a measured difference is noise-aware with
`gates.noise_sigmas` paired standard errors (see the stage module's docstring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict

from refit.stages.core.config import Recipe
from refit.stages.core.scores import judged_scores, previous_average
from refit.stages.core.text import benchmark_ngrams, word_ngrams
from refit.stages.curate.stage import curated_files, curated_texts

SPIKE_WINDOW = 20  # a loss spike is measured against the median of this many losses before it
RECOVERY_STEPS = 10  # a loss spike must come back under its running median within this many steps


CONTAMINATION_BATCH = 1024  # curated documents read at a time by the contamination gate


Figure = float | int | str | None


@with_config(ConfigDict(extra="forbid"))
class Gate(TypedDict):
    """One verdict of the audit: every gate is evaluated and reported, passed or not."""

    name: str
    passed: bool
    value: Figure  # what was measured (None: not measured, the reason says why)
    threshold: Figure  # what it was held against
    reason: str
    drivers: NotRequired[list[str]]  # the gain gate: benchmarks that moved beyond noise on their own
    estimator: NotRequired[str]  # the gain gate: gates.gain_estimator
    equal_weight: NotRequired[dict | None]  # the gain gate: the equal-weight average beside it


def gate(name: str, passed: bool, value: Figure, threshold: Figure, reason: str, **detail) -> Gate:
    return Gate(name=name, passed=bool(passed), value=value, threshold=threshold, reason=reason, **detail)


def sigma(error: float | None, sigmas: float) -> float:
    return 0.0 if error is None else sigmas * error


def _figure(entry: dict) -> str:
    change = f"delta {entry['delta']:+.4f} +- {entry['delta_stderr'] or 0:.4f}"
    return f"{entry['base']:.4f} -> {entry['candidate']:.4f} ({change})"


def _drivers(scores: dict, sigmas: float) -> list[str]:
    """The benchmarks behind the average's difference: those counted in it that move its way
    beyond noise on their own, the largest share first."""
    contributions = scores["contributions"]
    direction = 1 if scores["average"]["delta"] >= 0 else -1
    return [
        n
        for n in sorted(contributions, key=lambda n: -direction * contributions[n])
        if direction * contributions[n] > 0
        and (counted := scores["benchmarks"][n][scores["benchmarks"][n]["metric"]])["delta"] * direction
        > sigma(counted["delta_stderr"], sigmas)
    ]


ESTIMATED = {"items": "items-weighted", "precision": "precision-weighted", "equal": "equal-weight"}


def _gain_shown(average: dict, g) -> bool:
    return average["delta"] - sigma(average["delta_stderr"], g.noise_sigmas) > g.min_average_gain


def gain_gate(recipe: Recipe, evaluation: dict, scores: dict) -> Gate:
    """The average gain under `gates.gain_estimator`, beyond noise; the equal-weight average
    beside it; when it fails, what dominates its standard error and what would decide."""
    g, average, estimator = recipe.gates, scores["average"], scores["estimator"]
    drivers = _drivers(scores, g.noise_sigmas)
    counted = ", ".join(
        f"{n} {b['metric']} x{b['weight']:g} {b['items']} items, {100 * b['share']:.0f}% of the average "
        f"({100 * scores['contributions'][n]:+.1f})"
        for n, b in scores["benchmarks"].items()
    )
    passed = _gain_shown(average, g)
    reason = (
        f"{ESTIMATED[estimator]} average accuracy (gates.gain_estimator: {estimator}) {_figure(average)}; must "
        f"exceed {g.min_average_gain:+.4f} by {g.noise_sigmas:g} standard errors; equal-weight average "
        f"{_figure(scores['average_equal'])}; "
        + (f"driven by {', '.join(drivers)}" if drivers else "no benchmark moved beyond noise on its own")
        + f"; counted (metric x weight, items, share of the average, points of its difference): {counted}"
    )
    if not passed:
        reason += "; " + _what_would_decide(recipe, evaluation, scores)
    return gate(
        "average_accuracy_gain",
        passed,
        average["delta"],
        g.min_average_gain,
        reason,
        drivers=drivers,
        estimator=estimator,
        equal_weight=scores["average_equal"],
    )


def _what_would_decide(recipe: Recipe, evaluation: dict, scores: dict) -> str:
    """Which benchmarks make most of the average's standard error, and the changes that would let
    the data decide, cheapest first: another estimator, those benchmarks weighed out, more items."""
    g, average, shares = recipe.gates, scores["average"], scores["variance_shares"]
    dominant, covered = [], 0.0
    for name in sorted(shares, key=shares.get, reverse=True):  # the fewest that make half the variance
        if covered >= 0.5:
            break
        dominant.append(name)
        covered += shares[name]
    said = "its standard error comes mostly from " + ", ".join(
        f"{n} ({scores['benchmarks'][n]['items']} items, {100 * shares[n]:.0f}% of the variance)" for n in dominant
    )
    if average["delta"] <= g.min_average_gain:
        return (
            f"{said}; the difference itself does not exceed {g.min_average_gain:+.4f}: more data would not show a gain"
        )
    options = []
    for other in ESTIMATED:
        if other != scores["estimator"] and _gain_shown(
            other_average := judged_scores(recipe, evaluation, other)["average"], g
        ):
            options.append(f"gates.gain_estimator: {other} ({_figure(other_average)})")
    weighed_out = [
        b.model_copy(update={"weight": 0.0}) if b.name in dominant else b for b in recipe.evaluate.benchmarks
    ]
    without = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"benchmarks": weighed_out})})
    if (rest := judged_scores(without, evaluation)["average"]) is not None and _gain_shown(rest, g):
        options.append(f"weight 0 for {', '.join(dominant)} ({_figure(rest)})")
    needed = (average["delta"] - g.min_average_gain) / g.noise_sigmas  # the standard error that would decide
    options.append(f"about {(average['delta_stderr'] / needed) ** 2:.1f}x the items of every benchmark")
    return f"{said}; what would let the data decide: " + ", or ".join(options)


def accuracy_gates(recipe: Recipe, evaluation: dict, previous: dict | None) -> list[Gate]:
    """Average gain, above the previous version, per-benchmark regression: each on the metric
    and weight the recipe counts for each benchmark (stages/core/scores.py)."""
    g, gates = recipe.gates, []
    scores = judged_scores(recipe, evaluation)
    average = scores["average"]
    if average is None:
        return [
            gate(
                "average_accuracy_gain",
                False,
                None,
                g.min_average_gain,
                "no benchmarks in the recipe: nothing shows the candidate is better",
            )
        ]
    gates.append(gain_gate(recipe, evaluation, scores))
    if previous is not None and (prior_average := previous_average(scores, previous)) is not None:
        prior = prior_average["candidate"]
        bar = prior - sigma(prior_average["candidate_stderr"], g.noise_sigmas)
        gates.append(
            gate(
                "above_previous_version",
                average["candidate"] >= bar,
                average["candidate"],
                prior,
                f"{ESTIMATED[scores['estimator']]} average accuracy {average['candidate']:.4f} against the previous "
                f"published version's "
                f"{prior:.4f} on the same metrics and weights (fails only if lower by more than "
                f"{g.noise_sigmas:g} standard errors)",
            )
        )
    for name, bench in scores["benchmarks"].items():
        counted, other = bench[bench["metric"]], "acc" if bench["metric"] == "acc_norm" else "acc_norm"
        worst = counted["delta"] + sigma(counted["delta_stderr"], g.noise_sigmas)
        gates.append(
            gate(
                f"benchmark_regression:{name}",
                worst >= -g.max_benchmark_drop,
                counted["delta"],
                -g.max_benchmark_drop,
                f"{name} {bench['metric']} {_figure(counted)} ({bench['metric_reason']}; {other} "
                f"{_figure(bench[other])}); fails if below {-g.max_benchmark_drop:+.4f} beyond "
                f"{g.noise_sigmas:g} standard errors",
            )
        )
    return gates


def loss_gates(recipe: Recipe, evaluation: dict) -> list[Gate]:
    g, gates = recipe.gates, []
    for name, v in evaluation["validation"].items():
        loss = v["loss"]
        if v["role"] == "legacy":
            relative = loss["delta"] / loss["base"]
            best_case = (loss["delta"] - sigma(loss["delta_stderr"], g.noise_sigmas)) / loss["base"]
            gates.append(
                gate(
                    f"forgetting:{name}",
                    best_case <= g.max_legacy_loss_increase,
                    relative,
                    g.max_legacy_loss_increase,
                    f"legacy validation loss {loss['base']:.4f} -> {loss['candidate']:.4f} ({relative:+.2%}); "
                    f"fails if up by more than {g.max_legacy_loss_increase:.0%} beyond "
                    f"{g.noise_sigmas:g} standard errors",
                )
            )
        elif v["role"] == "new" and g.require_new_loss_decrease:
            upper = loss["delta"] + sigma(loss["delta_stderr"], g.noise_sigmas)
            gates.append(
                gate(
                    f"new_domain_learned:{name}",
                    upper < 0,
                    loss["delta"],
                    0.0,
                    f"new-domain validation loss {loss['base']:.4f} -> {loss['candidate']:.4f}; must fall by more "
                    f"than {g.noise_sigmas:g} standard errors ({loss['delta_stderr'] or 0:.4f})",
                )
            )
    return gates


def validation_warnings(recipe: Recipe, evaluation: dict) -> list[str]:
    """Validation sets too small for the loss gates to mean much: fewer tokens than
    curate.min_validation_tokens, or (legacy) a noise margin over half the forgetting limit."""
    g, warnings = recipe.gates, []
    for name, v in evaluation["validation"].items():
        if v["role"] not in ("legacy", "new"):
            continue
        problems = []
        if v["tokens"] < recipe.curate.min_validation_tokens:
            problems.append(f"{v['tokens']:,} tokens, fewer than curate.min_validation_tokens")
        margin = sigma(v["loss"]["delta_stderr"], g.noise_sigmas) / v["loss"]["base"]
        if v["role"] == "legacy" and margin > g.max_legacy_loss_increase / 2:
            problems.append(
                f"{g.noise_sigmas:g} standard errors of the loss difference are {margin:.1%} of the loss, over half "
                f"the {g.max_legacy_loss_increase:.0%} forgetting limit: forgetting near it is not told from noise"
            )
        if problems:
            capped = v.get("held_out_docs", v["docs"]) > v["docs"]
            warnings.append(
                f"validation set {name} ({v['role']}, {v['docs']} documents"
                + (f" of {v['held_out_docs']} held out: evaluate.validation_docs caps it" if capped else "")
                + "): "
                + "; ".join(problems)
                + "; hold out more text (sources[].validation_paths or curate.min_validation_tokens)"
            )
    return warnings


def contamination_gate(recipe: Recipe, workdir: Path, trained: list[str]) -> Gate:
    """Benchmark items sharing an n-gram with the curated training documents of the sources
    `trained` (read in record batches: memory does not grow with the corpus)."""
    n = recipe.curate.decontaminate_ngram
    owners = benchmark_ngrams(recipe.evaluate.benchmarks, n)

    found: set[str] = set()
    for source in trained:
        for path in curated_files(workdir, source, "train"):
            for texts in curated_texts(path, CONTAMINATION_BATCH):
                for text in texts.to_pylist():
                    found.update(owners[g] for g in word_ngrams(text, n) if g in owners)
    items = sorted(found)
    limit = recipe.gates.max_contaminated_items
    shown = ", ".join(items[:20]) + (f" and {len(items) - 20} more" if len(items) > 20 else "")
    return gate(
        "contamination",
        len(items) <= limit,
        len(items),
        limit,
        f"{len(items)} benchmark item(s) share a {n}-gram with the training data" + (f": {shown}" if items else ""),
    )


def loss_spikes(recipe: Recipe, metrics: list[dict]) -> list[dict]:
    """Each step whose loss is above gates.loss_spike_factor x the median of the SPIKE_WINDOW
    losses before it, and whether the loss came back under that median within RECOVERY_STEPS."""
    losses = np.array([m["loss"] for m in metrics])
    spikes = []
    for i in range(SPIKE_WINDOW, len(losses)):
        median = float(np.median(losses[i - SPIKE_WINDOW : i]))
        if losses[i] > recipe.gates.loss_spike_factor * median:
            after = losses[i + 1 : i + 1 + RECOVERY_STEPS]
            recovered = bool(len(after) and after.min() <= median)
            spikes.append({"step": metrics[i]["step"], "loss": float(losses[i]), "recovered": recovered})
    return spikes


def health_gate(recipe: Recipe, logs: list[list[dict]]) -> Gate:
    """No non-finite loss (training stops on one) and no loss spike left unrecovered, in every
    training log (with a soup, each ingredient's: `train.training_logs`)."""
    problems, unrecovered_count = [], 0
    for index, metrics in enumerate(logs):
        which = f"ingredient {index}: " if len(logs) > 1 else ""
        losses = np.array([m["loss"] for m in metrics])
        unrecovered = [spike["step"] for spike in loss_spikes(recipe, metrics) if not spike["recovered"]]
        unrecovered_count += len(unrecovered)
        if not np.all(np.isfinite(losses)):
            problems.append(f"{which}non-finite loss in the log")
        if unrecovered:
            problems.append(f"{which}unrecovered loss spikes at steps {unrecovered}")
    steps = " + ".join(str(len(metrics)) for metrics in logs)
    return gate(
        "training_health",
        not problems,
        unrecovered_count,
        0,
        "; ".join(problems)
        or f"{steps} steps, all finite, no unrecovered spike (> {recipe.gates.loss_spike_factor:g} x running median)",
    )


def lineage_gate(record: dict) -> Gate:
    """Every hash recorded; with a soup, every ingredient's weights too."""
    missing = [k for k, v in record.items() if v in (None, {}, "")]
    soup = record.get("soup") or {}
    missing += [
        f"soup.ingredients[{i['index']}].weights_sha256" for i in soup.get("ingredients", []) if not i["weights_sha256"]
    ]
    ok = not missing and record["shards_verified"]
    return gate(
        "lineage",
        ok,
        len(missing),
        0,
        "complete: base weights, recipe, manifest, shard and code hashes"
        + (f", the weights of all {len(soup['ingredients'])} soup ingredients" if soup else "")
        if ok
        else f"missing {', '.join(missing) or 'nothing'}; shards match the manifest: {record['shards_verified']}",
    )
