"""audit: every gate, the cost report and the lineage, in `<workdir>/audit/`.

Gates return {name, passed, value, threshold, reason}, all evaluated, all reported. Small
models give noisy numbers, so every gate on a measured difference is noise-aware with
`gates.noise_sigmas` standard errors (paired, from the evaluate stage):
  * an improvement must be shown beyond noise: value - sigmas x stderr must clear the bar;
  * a regression fails only when shown beyond noise: value + sigmas x stderr must cross it.
A failed audit still writes its reports (and done marker), then raises AuditFailed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from refit.stages import evaluate, mix, train
from refit.stages.curate import curated_files, curated_texts
from refit.stages.lib.config import Recipe
from refit.stages.lib.contract import Stage
from refit.stages.lib.markers import (
    code_version,
    file_sha256,
    fingerprint,
    is_done,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.lib.scores import judged_scores, previous_average
from refit.stages.lib.text import benchmark_ngrams, word_ngrams

FOLDER = "audit"

RECOVERY_STEPS = 10  # a loss spike must come back under its running median within this many steps
CONTAMINATION_BATCH = 1024  # curated documents read at a time by the contamination gate


class AuditFailed(RuntimeError):
    """The candidate must not ship; the message lists every failed gate."""


def gate(name: str, passed: bool, value, threshold, reason: str, **detail) -> dict:
    return {"name": name, "passed": bool(passed), "value": value, "threshold": threshold, "reason": reason, **detail}


def _sigma(error: float | None, sigmas: float) -> float:
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
        > _sigma(counted["delta_stderr"], sigmas)
    ]


def accuracy_gates(recipe: Recipe, evaluation: dict, previous: dict | None) -> list[dict]:
    """Average gain, above the previous version, per-benchmark regression: each on the metric
    and weight the recipe counts for each benchmark (stages/lib/scores.py)."""
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
    margin = _sigma(average["delta_stderr"], g.noise_sigmas)
    drivers = _drivers(scores, g.noise_sigmas)
    counted = ", ".join(
        f"{n} {b['metric']} x{b['weight']:g} ({100 * scores['contributions'][n]:+.1f})"
        for n, b in scores["benchmarks"].items()
    )
    gates.append(
        gate(
            "average_accuracy_gain",
            average["delta"] - margin > g.min_average_gain,
            average["delta"],
            g.min_average_gain,
            f"weighted average accuracy {_figure(average)}; must exceed {g.min_average_gain:+.4f} by "
            f"{g.noise_sigmas:g} standard errors; "
            + (f"driven by {', '.join(drivers)}" if drivers else "no benchmark moved beyond noise on its own")
            + "; counted (metric x weight, "
            f"points of the average's difference): {counted}",
            drivers=drivers,
        )
    )
    if previous is not None and (prior_average := previous_average(scores, previous)) is not None:
        prior = prior_average["candidate"]
        bar = prior - _sigma(prior_average["candidate_stderr"], g.noise_sigmas)
        gates.append(
            gate(
                "above_previous_version",
                average["candidate"] >= bar,
                average["candidate"],
                prior,
                f"weighted average accuracy {average['candidate']:.4f} against the previous published version's "
                f"{prior:.4f} on the same metrics and weights (fails only if lower by more than "
                f"{g.noise_sigmas:g} standard errors)",
            )
        )
    for name, bench in scores["benchmarks"].items():
        counted, other = bench[bench["metric"]], "acc" if bench["metric"] == "acc_norm" else "acc_norm"
        worst = counted["delta"] + _sigma(counted["delta_stderr"], g.noise_sigmas)
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


def loss_gates(recipe: Recipe, evaluation: dict) -> list[dict]:
    g, gates = recipe.gates, []
    for name, v in evaluation["validation"].items():
        loss = v["loss"]
        if v["role"] == "legacy":
            relative = loss["delta"] / loss["base"]
            best_case = (loss["delta"] - _sigma(loss["delta_stderr"], g.noise_sigmas)) / loss["base"]
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
            upper = loss["delta"] + _sigma(loss["delta_stderr"], g.noise_sigmas)
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
        margin = _sigma(v["loss"]["delta_stderr"], g.noise_sigmas) / v["loss"]["base"]
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


def contamination_gate(recipe: Recipe, workdir: Path, manifest: dict) -> dict:
    """Benchmark items sharing an n-gram with the documents actually trained on (read in
    record batches: memory does not grow with the corpus)."""
    n = recipe.curate.decontaminate_ngram
    owners = benchmark_ngrams(recipe.evaluate.benchmarks, n)

    found: set[str] = set()
    trained = [name for name, s in manifest["sources"].items() if s["drawn_sequences"] > 0]
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


def health_gate(recipe: Recipe, metrics: list[dict]) -> dict:
    """No non-finite loss (training stops on one) and no loss spike left unrecovered."""
    losses = np.array([m["loss"] for m in metrics])
    unrecovered = []
    window = 20
    for i in range(window, len(losses)):
        median = float(np.median(losses[i - window : i]))
        if losses[i] > recipe.gates.loss_spike_factor * median:
            after = losses[i + 1 : i + 1 + RECOVERY_STEPS]
            if not len(after) or after.min() > median:
                unrecovered.append(metrics[i]["step"])
    finite = bool(np.all(np.isfinite(losses)))
    return gate(
        "training_health",
        finite and not unrecovered,
        len(unrecovered),
        0,
        ("non-finite loss in the log; " if not finite else "")
        + (
            f"unrecovered loss spikes at steps {unrecovered}"
            if unrecovered
            else f"{len(losses)} steps, all finite, no unrecovered spike (> "
            f"{recipe.gates.loss_spike_factor:g} x running median)"
        ),
    )


def lineage(recipe: Recipe, workdir: Path, manifest: dict) -> dict:
    base = Path(recipe.base_model.path)
    weights = {p.name: file_sha256(p) for p in sorted(base.glob("*.safetensors"))}
    shards_ok = all(
        file_sha256(workdir / s["path"]) == s["sha256"] for src in manifest["sources"].values() for s in src["shards"]
    )
    return {
        "base_model": str(base),
        "base_config_sha256": file_sha256(base / "config.json") if (base / "config.json").exists() else None,
        "base_weights_sha256": weights,
        "recipe_sha256": hashlib.sha256(
            json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest(),
        "manifest_sha256": manifest.get("sha256"),
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
        "shards": sum(len(s["shards"]) for s in manifest["sources"].values()),
        "shards_verified": shards_ok,
        "code_version": code_version(train.__name__),  # of the training code
        "train_fingerprint": train.run_fingerprint(workdir),
    }


def lineage_gate(record: dict) -> dict:
    missing = [k for k, v in record.items() if v in (None, {}, "")]
    ok = not missing and record["shards_verified"]
    return gate(
        "lineage",
        ok,
        len(missing),
        0,
        "complete: base weights, recipe, manifest, shard and code hashes"
        if ok
        else f"missing {', '.join(missing) or 'nothing'}; shards match the manifest: {record['shards_verified']}",
    )


def cost_report(recipe: Recipe, train: dict, evaluation: dict, parameters: int) -> dict:
    """Training FLOPs and device-hours of this refresh against retraining from scratch."""
    hours = train["seconds"] * train["processes"] / 3600
    tokens_per_s = train["tokens"] / max(train["seconds"], 1e-9)
    price = recipe.cost.device_hour_price
    report = {
        "parameters": parameters,
        "tokens": train["tokens"],
        "flops": 6 * parameters * train["tokens"],
        "wall_seconds": train["seconds"],
        "devices": train["processes"],
        "device_hours": hours,
        "price_per_device_hour": price,
        "cost": hours * price,
        "tokens_per_second": tokens_per_s,
    }
    pretraining = recipe.base_model.pretraining_tokens
    if pretraining:
        scratch_hours = pretraining / tokens_per_s * train["processes"] / 3600
        report["retrain_from_scratch"] = {
            "tokens": pretraining,
            "flops": 6 * parameters * pretraining,
            "device_hours": scratch_hours,
            "cost": scratch_hours * price,
            "assumption": "same model at this run's measured tokens/s per device",
        }
        report["refit_over_scratch_compute"] = train["tokens"] / pretraining
    average = judged_scores(recipe, evaluation)["average"]
    if average and hours > 0:
        report["accuracy_points_per_device_hour"] = 100 * average["delta"] / hours
    return report


def input_fingerprint(recipe: Recipe, workdir: Path, previous_eval: dict | None = None) -> str:
    section = {
        "gates": recipe.gates.model_dump(mode="json"),
        "cost": recipe.cost.model_dump(mode="json"),
        "validation_tokens": recipe.curate.min_validation_tokens,  # for its warnings
        "counted": [
            b.model_dump(mode="json", include={"name", "metric", "weight"}) for b in recipe.evaluate.benchmarks
        ],
        "previous": previous_eval,
    }
    upstream = [stage.STAGE.produced(workdir, "audit") for stage in (mix, train, evaluate)]
    return fingerprint("audit", section, upstream, code_version(__name__))


def run_audit(recipe: Recipe, workdir: Path, force: bool = False, previous_eval: dict | None = None) -> dict:
    """Write audit/report.json and audit/report.md with plots; raise AuditFailed if a gate fails."""
    from refit.stages.lib.audit_report import write_report
    from refit.stages.lib.safety_audit import safety_gates

    workdir = Path(workdir)
    final = workdir / FOLDER
    expected = input_fingerprint(recipe, workdir, previous_eval)
    if force or not is_done(final, expected):
        started = time.time()
        manifest = mix.read_manifest(workdir)
        trained = train.read_report(workdir)
        evaluation = evaluate.read_report(workdir)
        metrics = train.read_metrics(workdir)
        record = lineage(recipe, workdir, manifest)
        gates = [
            *accuracy_gates(recipe, evaluation, previous_eval),
            *loss_gates(recipe, evaluation),
            *safety_gates(recipe, evaluation),
            contamination_gate(recipe, workdir, manifest),
            health_gate(recipe, metrics),
            lineage_gate(record),
        ]
        from safetensors import safe_open

        parameters = 0
        for path in sorted(train.final_model(workdir).glob("*.safetensors")):
            with safe_open(path, "np") as weights:
                parameters += sum(int(np.prod(weights.get_slice(k).get_shape())) for k in weights.keys())
        report = {
            "stage": "audit",
            "recipe": recipe.name,
            "passed": all(g["passed"] for g in gates),
            "gates": gates,
            "failed": [g["reason"] for g in gates if not g["passed"]],
            "scores": judged_scores(recipe, evaluation),
            "warnings": manifest.get("warnings", []) + validation_warnings(recipe, evaluation),
            "cost": cost_report(recipe, trained, evaluation, parameters),
            "lineage": record,
            "candidate": str(train.final_model(workdir)),
            "train": trained,
        }
        with staged_output(final) as out:
            write_report(out, report, evaluation, metrics, manifest)
            write_json_atomic(out / "report.json", report)
            write_marker(out, "audit", expected, started, code_version(__name__))
    report = read_report(workdir)
    if not report["passed"]:
        raise AuditFailed(
            f"audit of {recipe.name} failed {len(report['failed'])} gate(s):\n  - "
            + "\n  - ".join(report["failed"])
            + f"\nfull report: {report_markdown(workdir)}"
        )
    return report


def read_report(workdir: Path) -> dict:
    """The finished audit: verdict, every gate, cost, lineage."""
    return json.loads((Path(workdir) / FOLDER / "report.json").read_text())


def report_markdown(workdir: Path) -> Path:
    """The audit report for people (Markdown with its plots beside it)."""
    return Path(workdir) / FOLDER / "report.md"


def has_report(workdir: Path) -> bool:
    return (Path(workdir) / FOLDER / "report.json").is_file()


STAGE = Stage(
    name="audit",
    reads=("mix", "train", "evaluate"),
    sections=("gates", "cost"),
    folder=FOLDER,
    run_function=run_audit,
    fingerprint_function=input_fingerprint,
    takes=("previous_eval",),
)
