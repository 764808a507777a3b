"""Terminal summaries of a workdir's results: accuracy and loss tables, the audit verdict."""

from __future__ import annotations

import json
from pathlib import Path

from refit.stages.audit import stage as audit
from refit.stages.core.capacity import USABLE, GiB, Plan, Setup
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


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def _count(n: float) -> str:
    """8.03B, 218M, 2.6M, 400k."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _setup(setup: Setup) -> str:
    checkpointing = "with" if setup.activation_checkpointing else "without"
    return (
        f"{setup.strategy} over {setup.num_processes} process(es), micro_batch_size {setup.micro_batch_size}, "
        f"{checkpointing} activation checkpointing"
    )


def _changes(changes: dict) -> str:
    """As the recipe writes them: train.strategy: fsdp, train.activation_checkpointing: true."""
    return ", ".join(f"train.{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())


def capacity_problem(plan: Plan) -> str | None:
    """Why the recipe's setup does not fit its devices and the smallest change that would, in
    one line for `refit validate`; None when it fits or the device's memory is unknown."""
    if plan.fits() is not False:
        return None
    device, usable = plan.device, plan.usable
    said = (
        f"{_setup(plan.setup)} needs {_size(plan.memory.total)} per device, more than the {_size(usable)} "
        f"({USABLE:.0%}) usable of the {_size(device.memory)} of {device.memory_from}"
    )
    if plan.fix is None:
        return (
            f"{said}; no smaller micro-batch, fsdp, activation checkpointing or more processes (dividing "
            "train.sequences_per_step) fits: shorten tokenize.seq_len or use devices with more memory"
        )
    changes, needs = plan.fix
    return f"{said}; the smallest change that fits: {_changes(changes)} ({_size(needs.total)})"


def format_capacity(plan: Plan) -> str:
    """The capacity plan as `refit plan` and `refit validate` print it: memory per device under
    each strategy with and without activation checkpointing, whether it fits, and the time and
    cost of the full run and of a pilot variant."""
    shape, device, setup = plan.shape, plan.device, plan.setup
    dtype = "bf16" if device.compute_bytes == 2 else "fp32"
    lines = [
        f"capacity: {_count(shape.parameters)} parameters ({shape.layers} layers of {_count(shape.layer_parameters)}, "
        f"hidden {shape.hidden}, vocabulary {shape.vocab}), computing in {dtype} on {device.name}",
        f"per device: {setup.num_processes} process(es), micro-batches of {setup.micro_batch_size} x {setup.seq_len} "
        f"tokens, {setup.accumulation} per step",
        f"  {'strategy':<10}{'checkpointing':<15}{'parameters':>12}{'gradients':>12}{'optimizer':>12}"
        f"{'activations':>13}{'peak':>12}  fits",
    ]
    for (strategy, checkpointing), needs in plan.table.items():
        mine = (strategy, checkpointing) == (setup.strategy, setup.activation_checkpointing)
        fits = {None: "", True: "yes", False: "no"}[plan.fits(needs)]
        lines.append(
            f"{'*' if mine else ' '} {strategy:<10}{'on' if checkpointing else 'off':<15}{_size(needs.parameters):>12}"
            f"{_size(needs.gradients):>12}{_size(needs.optimizer):>12}{_size(needs.activations):>13}"
            f"{_size(needs.total):>12}  {fits}".rstrip()
        )
    if device.memory is None:
        memory = "not checked: no train.device_memory stated and no GPU visible"
    else:
        memory = f"at most {_size(plan.usable)} ({USABLE:.0%} of the {_size(device.memory)} of {device.memory_from})"
    lines.append(f"(* the recipe's; fits: {memory})")
    if setup.accumulation == 1:
        lines.append("(one micro-batch per step: the gradients grow as the backward pass frees the activations)")
    else:
        lines.append(
            f"(fsdp: between the {setup.accumulation} micro-batches of a step each process holds all the fp32 "
            "gradients, unsharded; one micro-batch per step and process keeps them sharded)"
        )
    if problem := capacity_problem(plan):
        lines.append(f"does not fit: {problem}")
    if plan.tokens_per_second is None:
        lines.append(
            f"time and cost: not estimated, the peak FLOP/s is {device.peak_from}: give cost.device_peak_flops"
        )
        return "\n".join(lines)
    lines.append(
        f"throughput: {plan.tokens_per_second:,.0f} tokens/s per device at {plan.mfu:.0%} MFU of "
        f"{device.peak_flops / 1e12:.3g} TFLOP/s ({device.peak_from}), "
        f"{plan.tokens_per_second * setup.num_processes:,.0f} tokens/s in all"
    )
    labels = {"full": "full run", "pilot": "pilot variant"}
    for name, run in plan.runs.items():
        share = f" ({run.tokens / plan.runs['full'].tokens:.0%})" if name == "pilot" else ""
        lines.append(
            f"  {labels[name] + share:<22}{_count(run.tokens):>8} tokens{_duration(run.seconds):>12}"
            f"{run.device_hours:>12.3g} device-hours{run.cost:>12,.2f} USD"
        )
    return "\n".join(lines)
