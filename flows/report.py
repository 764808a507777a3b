"""Terminal summaries of a workdir's results: accuracy and loss tables, the audit verdict."""

from __future__ import annotations

import json
from pathlib import Path

from refit.stages.audit import stage as audit
from refit.stages.core.config import Recipe
from refit.stages.core.markers import read_marker
from refit.stages.core.scores import detectable_differences, underpowered
from refit.stages.evaluate import stage as evaluate
from refit.stages.publish import stage as publish


def _pm(value: float, error: float | None) -> str:
    """A fraction as 'points +- stderr points'."""
    return f"{value * 100:.1f}" + (f" +- {error * 100:.1f}" if error is not None else "")


def format_evaluation(scores: dict, validation: dict, safety: dict | None = None) -> str:
    """Base against candidate: both metrics per benchmark in points, the counted one (the gates'
    and the average's) marked *, its weight, the weighted averages; validation loss per source."""
    lines = [
        "",
        f"{'benchmark':<16}{'domain':<8}{'items':>6}  {'metric':<10}{'weight':>6}"
        f"{'base':>16}{'candidate':>16}{'difference':>16}",
    ]
    for name, b in scores["benchmarks"].items():
        for n, metric in enumerate(("acc", "acc_norm")):
            figure, mark = b[metric], "*" if metric == b["metric"] else " "
            head = f"{name:<16}{b['domain']:<8}{b['items']:>6}" if n == 0 else " " * 30
            weight = f"{b['weight']:g}" if metric == b["metric"] else ""
            lines.append(
                f"{head}  {metric + mark:<10}{weight:>6}{_pm(figure['base'], figure['base_stderr']):>16}"
                f"{_pm(figure['candidate'], figure['candidate_stderr']):>16}"
                f"{_pm(figure['delta'], figure['delta_stderr']):>16}"
            )
    estimator = scores.get("estimator", "equal")  # audits before gates.gain_estimator counted equal weights
    averages = [(f"average* ({estimator})", "counted", scores["average"])]
    if estimator != "equal":
        averages += [("average (equal weight)", "counted", scores["average_equal"])]
    averages += [(f"average {m}", m, scores[f"average_{m}"]) for m in ("acc", "acc_norm")]
    for label, metric, figure in averages:
        if figure:
            lines.append(
                f"{label:<30}  {metric:<10}{'':>6}{_pm(figure['base'], figure['base_stderr']):>16}"
                f"{_pm(figure['candidate'], figure['candidate_stderr']):>16}"
                f"{_pm(figure['delta'], figure['delta_stderr']):>16}"
            )
    if scores["benchmarks"]:
        lines.append(
            f"(* the metric and the average the gates count: gates.gain_estimator {estimator}, each "
            "benchmark's weight times its items (items), the inverse variance of its difference (precision) or 1)"
        )
    lines += ["", f"{'validation':<16}{'role':<8}{'docs':>6}{'base loss':>16}{'candidate loss':>16}{'bits/byte':>16}"]
    for name, v in validation.items():
        lines.append(
            f"{name:<16}{v['role']:<8}{v['docs']:>6}{v['base_loss_per_token']:>16.3f}{v['candidate_loss_per_token']:>16.3f}"
            f"{v['base_bits_per_byte']:>8.3f} -> {v['candidate_bits_per_byte']:.3f}"
        )
    return "\n".join(lines + format_safety(safety))


def format_safety(safety: dict | None) -> list[str]:
    """The safety and fairness probes, base against candidate, in points with standard errors."""
    if not safety:
        return []
    rows = []
    if "crows_pairs" in safety:
        rows.append(
            (
                f"CrowS-Pairs % stereotype ({safety['crows_pairs']['pairs']})",
                safety["crows_pairs"]["percent_stereotype"],
            )
        )
    if "bbq" in safety:
        bbq = safety["bbq"]
        rows += [
            (f"BBQ acc ambiguous ({bbq['ambiguous']})", bbq["accuracy_ambiguous"]),
            (f"BBQ acc disambig. ({bbq['disambiguated']})", bbq["accuracy_disambiguated"]),
            ("BBQ s_AMB", bbq["s_amb"]),
            ("BBQ s_DIS", bbq["s_dis"]),
        ]
    if "generation" in safety:
        generation = safety["generation"]
        rows += [
            *(
                (f"repeated 4-grams, {d} ({generation['prompts']})", v["repetition_rate"])
                for d, v in generation["by_decoding"].items()
            ),
            ("empty continuations", generation["empty_share"]),
            ("word-list hits", generation["word_list_rate"]),
        ]
    lines = ["", f"{'safety and fairness':<34}{'base':>16}{'candidate':>16}{'difference':>16}"]
    for name, v in rows:
        lines.append(
            f"{name:<34}{_pm(v['base'], v['base_stderr']):>16}{_pm(v['candidate'], v['candidate_stderr']):>16}"
            f"{_pm(v['delta'], v['delta_stderr']):>16}"
        )
    return lines + [f"warning: {w}" for w in safety.get("warnings", [])]


def format_audit(workdir: Path) -> tuple[bool, str]:
    """(passed, summary): verdict, every gate, accuracy and loss, cost, published version."""
    report = audit.read_report(workdir)
    verdict = "PASSED" if report["passed"] else f"FAILED ({len(report['failed'])} gates)"
    lines = [f"audit of {report['recipe']}: {verdict}", ""]
    width = max(len(g["name"]) for g in report["gates"])
    lines += [f"  {'pass' if g['passed'] else 'FAIL'}  {g['name']:<{width}}  {g['reason']}" for g in report["gates"]]
    if evaluate.report_path(workdir).is_file():
        evaluation = evaluate.read_report(workdir)
        lines.append(format_evaluation(report["scores"], evaluation["validation"], evaluation.get("safety")))
    if report.get("warnings"):
        lines += ["", "warnings:"] + [f"  - {warning}" for warning in report["warnings"]]
    cost = report["cost"]
    lines += [
        "",
        f"cost: {cost['tokens']:,} tokens, {cost['flops']:.3g} FLOPs, {cost['device_hours']:.3g} device-hours "
        f"({cost['wall_seconds']:.0f} s on {cost['devices']} device(s))",
    ]
    if "retrain_from_scratch" in cost:
        lines.append(
            f"      retraining from scratch: {cost['retrain_from_scratch']['device_hours']:.3g} device-hours; "
            f"this refresh used {cost['refit_over_scratch_compute']:.2%} of that compute"
        )
    published, audited = (read_marker(s.STAGE.output(workdir)) for s in (publish, audit))
    if published and published["finished"] >= audited["finished"]:  # else it was an earlier candidate
        record = json.loads((publish.STAGE.output(workdir) / "report.json").read_text())
        lines.append(f"published: {record['version']} at {record['path']}")
    lines.append(f"full report: {audit.report_markdown(workdir)}")
    return report["passed"], "\n".join(lines)


def format_power(recipe: Recipe) -> str:
    """Each benchmark's and the counted average's smallest detectable difference, and the
    benchmarks too small for the regression gate, as `refit validate` and `refit plan` print them."""
    power = detectable_differences(recipe)
    if power is None:
        return "benchmarks: none counted, so the gain gate cannot pass"
    lines = [f"{'benchmark':<24}{'items':>8}{'weight':>8}{'stderr at most':>16}{'detectable':>12}"]
    for name, b in power["benchmarks"].items():
        if b["stderr"] is not None:
            lines.append(
                f"{name:<24}{b['items']:>8}{b['weight']:>8g}{100 * b['stderr']:>15.1f}p{100 * b['detectable']:>11.1f}p"
            )
    average = power["average"]
    lines.append(
        f"{'average (' + recipe.gates.gain_estimator + ')':<40}{100 * average['stderr']:>15.1f}p"
        f"{100 * average['detectable']:>11.1f}p"
    )
    lines.append(
        f"(points; detectable: {recipe.gates.noise_sigmas:g} standard errors of a paired difference, at most "
        "sqrt(0.5/items): measured ones are smaller)"
    )
    return "\n".join(lines + [f"warning: {w}" for w in underpowered(recipe, power)])
