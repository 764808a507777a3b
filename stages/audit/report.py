"""The audit report a reviewer reads: Markdown tables and PNG plots beside it."""

from __future__ import annotations

from pathlib import Path

from refit.stages.audit.plots import plot_bars, plot_training
from refit.stages.audit.safety_gates import safety_section
from refit.stages.mix.manifest import Manifest


def _validation_line(validation: dict) -> str:
    """The held-out loss the training scored at its checkpoints, first and last, or why none."""
    if "off" in validation:
        return f"no validation loss at checkpoints ({validation['off']})"
    losses = validation["losses"]
    return (
        f"validation loss at checkpoints {losses[0]['val_loss']:.3f} (step {losses[0]['checkpoint']}) -> "
        f"{losses[-1]['val_loss']:.3f} (step {losses[-1]['checkpoint']}) on {validation['tokens']:,} held-out tokens"
        + "".join(f", none of {name}" for name in validation["sources_without_documents"])
    )


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _optimizer_warmup(train: dict) -> str:
    """The optimizer warm-up's steps, when the run had some (they count in the cost's tokens)."""
    steps = train["optimizer_warmup_steps"]
    if not steps:
        return ""
    return f" (after {steps} optimizer warm-up steps at LR 0 on {train['optimizer_warmup_tokens']:,} tokens)"


def _points(figure: dict) -> str:
    """'base -> candidate | difference +- stderr' in points."""
    return (
        f"{100 * figure['base']:.1f} -> {100 * figure['candidate']:.1f} | "
        f"{100 * figure['delta']:+.1f} +- {100 * (figure['delta_stderr'] or 0):.1f}"
    )


def _delta(figure: dict | None, scale: float = 100, digits: int = 1) -> str:
    """'difference +- stderr' (points by default), empty when not measured."""
    if figure is None or figure.get("delta") is None:
        return ""
    return f"{scale * figure['delta']:+.{digits}f} +- {scale * (figure['delta_stderr'] or 0):.{digits}f}"


def _row(*cells) -> str:
    return "| " + " | ".join(cells) + " |"


def soup_section(report: dict) -> list[str]:
    """The "Soup" section: each ingredient's counted average and validation losses beside the
    soup's, and the soup against the best ingredient and the mean of the ingredients (paired)."""
    soup = report.get("soup")
    if not soup:
        return []
    sources, benches, best = list(soup["validation"]), soup["benchmarks"], soup["best"]
    trained = {i["index"]: i["val_loss"] for i in (report["lineage"].get("soup") or {}).get("ingredients", [])}
    lines = [
        "",
        "## Soup",
        "",
        f"The candidate is the {soup['method']} soup of {len(soup['ingredients'])} anneal ingredients branched off "
        f"the shared run at step {soup['branch_step']}, averaging ingredients {', '.join(map(str, soup['kept']))}: "
        f"every gate above reads the soup. Each ingredient was scored on the same items and documents. The best, "
        f"ingredient {best}, has {soup['best_by']}, on the very items compared here: the soup's difference from "
        "it is biased towards the ingredient. Accuracy in points of the counted metrics, losses in nats per token; "
        "differences are the soup's, with paired standard errors. The safety probes compare base and soup only.",
        "",
        _row("model", "in the soup", "counted average", *(f"{s} loss" for s in sources), "held-out loss in training"),
        "|---" * (4 + len(sources)) + "|",
    ]
    for ingredient in soup["ingredients"]:
        index, average = ingredient["index"], ingredient["average"]
        lines.append(
            _row(
                f"ingredient {index}" + (" (best)" if index == best else ""),
                "yes" if ingredient["kept"] else "no",
                "" if average is None else f"{100 * average:.1f} +- {100 * (ingredient['average_stderr'] or 0):.1f}",
                *(f"{ingredient['validation'][s]:.4f}" for s in sources),
                _cell(trained.get(index)),
            )
        )
    mean = soup["average"]["vs_mean"]
    lines.append(
        _row(
            "**soup**",
            "",
            "" if mean is None else f"{100 * mean['candidate']:.1f} +- {100 * (mean['candidate_stderr'] or 0):.1f}",
            *(f"{soup['validation'][s]['vs_mean']['candidate']:.4f}" for s in sources),
            "",
        )
    )
    lines += [
        "",
        _row("soup against", "counted average", *(f"{n} ({b['metric']})" for n, b in benches.items()), *sources),
        "|---" * (2 + len(benches) + len(sources)) + "|",
    ]
    for label, key in ((f"the best ingredient ({best})", "vs_best"), ("the mean of the ingredients", "vs_mean")):
        lines.append(
            _row(
                label,
                _delta(soup["average"][key]),
                *(_delta(b[key]) for b in benches.values()),
                *(_delta(soup["validation"][s][key], 1, 4) for s in sources),
            )
        )
    return lines


def lineage_section(record: dict) -> list[str]:
    """The lineage's hashes, and with a soup its averaging rule and every ingredient."""
    lines = ["", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in record.items() if k != "soup"]
    if soup := record.get("soup"):
        lines.append(
            f"- soup ({soup['method']}): {soup['rule']}; branched off the shared run at step {soup['branch_step']}"
        )
        for ingredient in soup["ingredients"]:
            hashes = ", ".join(f"{name} `{digest}`" for name, digest in ingredient["weights_sha256"].items())
            lines.append(
                f"  - ingredient {ingredient['index']}: `{ingredient['model']}`, held-out loss "
                f"{_cell(ingredient['val_loss']) or 'not measured'}; sha256 {hashes or 'missing'}"
            )
    return lines


def write_report(out: Path, report: dict, evaluation: dict, metrics: list[dict], manifest: Manifest) -> None:
    scores = report["scores"]
    benches = scores["benchmarks"]
    counted = {name: b[b["metric"]] for name, b in benches.items()}
    training_png = plot_training(out, metrics, manifest)
    accuracy_png = plot_bars(
        out,
        "accuracy.png",
        [f"{name} ({b['metric']})" for name, b in benches.items()],
        [100 * c["base"] for c in counted.values()],
        [100 * c["candidate"] for c in counted.values()],
        (
            [100 * (c["base_stderr"] or 0) for c in counted.values()],
            [100 * (c["candidate_stderr"] or 0) for c in counted.values()],
        ),
        "accuracy, counted metric (%)",
    )
    validation = evaluation["validation"]
    loss_png = plot_bars(
        out,
        "validation_loss.png",
        [f"{k} ({v['role']})" for k, v in validation.items()],
        [v["base_loss_per_token"] for v in validation.values()],
        [v["candidate_loss_per_token"] for v in validation.values()],
        None,
        "loss per token (nats)",
    )
    verdict = (
        "PASSED: the candidate may be published" if report["passed"] else "FAILED: the candidate must not be published"
    )
    lines = [f"# Audit of `{report['recipe']}`", "", f"**{verdict}.**", ""]
    if report["failed"]:
        lines += ["Failed gates:", ""] + [f"- {reason}" for reason in report["failed"]] + [""]
    if report.get("warnings"):
        lines += ["Warnings (data mix):", ""] + [f"- {warning}" for warning in report["warnings"]] + [""]
    lines += ["## Gates", "", "| gate | passed | value | threshold | reason |", "|---|---|---|---|---|"]
    lines += [
        f"| {g['name']} | {'yes' if g['passed'] else '**no**'} | {_cell(g['value'])} | "
        f"{_cell(g['threshold'])} | {g['reason']} |"
        for g in report["gates"]
    ]
    lines += [
        "",
        "## Accuracy, base against candidate",
        "",
        f"![accuracy]({accuracy_png})",
        "",
        "Points; differences with their paired standard errors. The gates and the average count the metric and "
        "weight named per benchmark (acc: highest log-likelihood; acc_norm: highest per character).",
        "",
        "| benchmark | domain | items | counted (why) | weight | acc base -> candidate | acc difference "
        "| acc_norm base -> candidate | acc_norm difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in benches.items():
        lines.append(
            f"| {name} | {b['domain']} | {b['items']} | {b['metric']} ({b['metric_reason']}) | {b['weight']:g} | "
            + " | ".join(_points(b[metric]) for metric in ("acc", "acc_norm"))
            + " |"
        )
    averages = [(f"**{scores['estimator']}-weighted average, counted metrics** (the gain gate's)", scores["average"])]
    averages += [("equal-weight average, counted metrics", scores["average_equal"])]
    averages += [(f"weighted average, {m} everywhere", scores[f"average_{m}"]) for m in ("acc", "acc_norm")]
    for label, average in averages:
        if average:
            lines.append(f"| {label} | | | | | {_points(average)} | | |")
    lines += [
        "",
        "## Validation loss per source (held-out documents)",
        "",
        f"![validation loss]({loss_png})",
        "",
        "| source | role | docs | base loss | candidate loss | base bits/byte | candidate bits/byte |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['role']} | {v['docs']} | {v['base_loss_per_token']:.3f} | {v['candidate_loss_per_token']:.3f} | "
        f"{v['base_bits_per_byte']:.3f} | {v['candidate_bits_per_byte']:.3f} |"
        for k, v in validation.items()
    ]

    lines += soup_section(report)
    lines += safety_section(out, evaluation)
    train = report["train"]
    switches = ", ".join(f"{s['phase']} at step {s['step']} (LR {s['lr']:.2e})" for s in train["switches"]) or "none"
    lines += [
        "",
        "## Training",
        "",
        f"![loss and learning rate]({training_png})",
        "",
        f"{train['steps']} steps, {train['tokens']:,} tokens{_optimizer_warmup(train)}, "
        f"loss {train['first_loss']:.3f} -> {train['final_loss']:.3f}; {_validation_line(train['validation'])}; "
        f"data switches: {switches}; loss spikes: {len(report['loss_spikes'])}.",
    ]
    cost = report["cost"]
    lines += ["", "## Cost", "", "| | this refresh | retrain from scratch |", "|---|---|---|"]
    scratch = cost.get("retrain_from_scratch", {})
    lines += [
        f"| tokens | {cost['tokens']:,} | {_cell(scratch.get('tokens')) or 'unknown'} |",
        f"| training FLOPs (6 x {cost['parameters']:,} params x tokens) | {cost['flops']:.3g} | "
        f"{_cell(float(scratch['flops'])) if scratch else ''} |",
        f"| device-hours | {cost['device_hours']:.4g} | {_cell(scratch.get('device_hours'))} |",
        f"| cost at {cost['price_per_device_hour']:g} per device-hour | {cost['cost']:.4g} | "
        f"{_cell(scratch.get('cost'))} |",
    ]
    if soup := cost.get("soup"):  # after the tokens' line
        lines[-3:-3] = [
            f"| of which the shared prefix, trained once | {soup['shared_tokens']:,} | |",
            f"| of which the anneals of {soup['ingredients']} ingredients, each trained once | "
            f"{' + '.join(f'{t:,}' for t in soup['anneal_tokens'])} | |",
        ] + (
            [f"| of which the optimizer warm-up | {cost['optimizer_warmup_tokens']:,} | |"]
            if cost["optimizer_warmup_tokens"]
            else []
        )
    if "accuracy_points_per_device_hour" in cost:
        lines.append(
            f"\nAverage accuracy gained per device-hour: {cost['accuracy_points_per_device_hour']:.3g} points "
            f"(measured wall time {cost['wall_seconds']:.0f} s on {cost['devices']} device(s))."
        )
    if scratch:
        lines.append(f"Retraining from scratch is estimated for the {scratch['assumption']}.")
    lines += lineage_section(report["lineage"])
    (out / "report.md").write_text("\n".join(lines) + "\n")
