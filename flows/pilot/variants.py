"""Pilot sweep: variants of a recipe at a fraction of its token budget, side by side.

Every variant is the resolved recipe with some fields overridden (`schedule.max_lr`,
`mixture.phases.1.lr_below`, ...), written as a complete recipe in its own workdir under
`<workdir>/sweep/` and validated like any recipe. Variants share the curated and tokenized
data (symlinked), so only mix, train and evaluate run per variant; that is why only the
schedule, mixture, train and soup sections may be swept (`soup.ingredients=1,3`: does
souping the anneal pay at this scale). Two baselines run beside the grid at the same budget:
continuing on the legacy data alone (the paper's baseline) and the general blend without a
switch, each a single run (one phase has no anneal to soup). The winner is chosen by the rule
in the recipe's `sweep` section.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refit.stages.audit.gates import accuracy_gates, contamination_gate, health_gate, loss_gates
from refit.stages.core.config import VARIANT_GATES, Recipe, load_recipe
from refit.stages.core.markers import write_text_atomic
from refit.stages.core.scores import METRICS, judged_scores
from refit.stages.mix import stage as mix
from refit.stages.mix.manifest import Manifest
from refit.stages.train import stage as train

SWEEPABLE = ("schedule.", "mixture.", "train.", "soup.")
SHARED_STAGES = ("curate", "tokenize")
SWEEP_DIR = "sweep"  # <workdir>/sweep/: one folder per variant, and the results


class SweepError(ValueError):
    """The sweep's command line or grid is invalid; nothing ran."""


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "grid" or "baseline"
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _value(text: str) -> Any:
    """A grid value as a number when it reads as one (YAML 1.1 reads 3e-3 as a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_grid(specs: list[str]) -> dict[str, list]:
    """["schedule.max_lr=3e-3,1e-3", ...] -> {"schedule.max_lr": [0.003, 0.001], ...}."""
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SweepError(f"--grid {spec!r}: expected KEY=V1,V2,... (for example schedule.max_lr=3e-3,1e-3)")
        if not key.startswith(SWEEPABLE):
            raise SweepError(
                f"--grid {key}: only {', '.join(p + '*' for p in SWEEPABLE)} can be swept; the variants "
                f"share the curated and tokenized data"
            )
        if key in grid:
            raise SweepError(f"--grid {key} is given twice")
        grid[key] = [_value(v.strip()) for v in values.split(",")]
    return grid


def check_grid(recipe: Recipe, specs: list[str]) -> dict[str, list]:
    """The parsed grid, every key checked against the recipe's fields before anything runs: a
    typo fails the sweep at once (SweepError naming the key), not after the shared stages."""
    grid = parse_grid(specs)
    for key, values in grid.items():
        try:
            set_field(recipe.model_dump(mode="json"), key, values[0])
        except SweepError as error:
            raise SweepError(f"--grid {error}") from None
    return grid


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", f"{value:g}" if isinstance(value, float) else str(value))


def plan_variants(recipe: Recipe, grid: dict[str, list]) -> list[Variant]:
    """The grid's combinations, then the two baselines."""
    variants = []
    for values in itertools.product(*grid.values()):
        overrides = dict(zip(grid, values))
        name = "-".join(f"{key.rsplit('.', 1)[-1]}{_slug(v)}" for key, v in overrides.items()) or "recipe"
        variants.append(Variant(name, "grid", overrides, ", ".join(f"{k}={v}" for k, v in overrides.items())))
    names = [v.name for v in variants]
    for n, variant in enumerate(variants):  # values that print alike (1 and 1.0) still get their own workdir
        if names.count(variant.name) > 1:
            variants[n] = Variant(
                f"{variant.name}-{names[: n + 1].count(variant.name)}",
                variant.kind,
                variant.overrides,
                variant.description,
            )
    legacy = [s.name for s in recipe.sources if s.role == "legacy"]
    if not legacy:
        raise SweepError("the legacy-only baseline needs a source with role: legacy")
    first = recipe.mixture.phases[0].model_dump(mode="json")
    single = {"soup.ingredients": 1} if recipe.soup.ingredients > 1 else {}  # one phase: no anneal to soup
    variants.append(
        Variant(
            "baseline-legacy-only",
            "baseline",
            {"mixture.phases": [{"name": "legacy-only", "weights": dict.fromkeys(legacy, 1.0)}], **single},
            "continue on the legacy data alone (the paper's baseline)",
        )
    )
    variants.append(
        Variant(
            "baseline-no-switch",
            "baseline",
            {"mixture.phases": [first], **single},
            f"the general blend ({first['name']}) for the whole run, no switch",
        )
    )
    return variants


def set_field(data: dict, dotted: str, value: Any) -> None:
    """Set a dotted recipe path (list items by index) in a recipe dict; the field must exist."""
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
        exists = (
            (0 <= key < len(node))
            if isinstance(node, list) and isinstance(key, int)
            else (isinstance(node, dict) and key in node)
        )
        if not exists:
            raise SweepError(f"{dotted}: the recipe has no field {part!r} there")
        if depth == len(parts) - 1:
            node[key] = value
        else:
            node = node[key]


def variant_recipe(recipe: Recipe, overrides: dict[str, Any], workdir: Path | None, budget_fraction: float) -> dict:
    """The resolved recipe with the overrides, at budget_fraction of its tokens (1 = full run)."""
    data = recipe.model_dump(mode="json")
    for key, value in overrides.items():
        set_field(data, key, value)
    data["schedule"]["total_tokens"] = max(1, int(data["schedule"]["total_tokens"] * budget_fraction))
    if workdir is not None:
        data["workdir"] = str(workdir)
    return data


def device_slots(recipe: Recipe) -> list[list[int] | None]:
    """The device ids of each concurrent variant: sweep.devices split into groups of
    train.num_processes; [None] (every visible device, one variant at a time) when one group."""
    size = recipe.train.num_processes
    slots = recipe.sweep.devices // size
    return [list(range(n * size, (n + 1) * size)) for n in range(slots)] if slots > 1 else [None]


def prepare_variant(
    recipe: Recipe, variant: Variant, workdir: Path, budget_fraction: float, devices: list[int] | None = None
) -> Recipe:
    """Write the variant's recipe in `<workdir>/sweep/<variant>/`, link the shared data, and
    validate it (RecipeError names a contradicting field, e.g. a switch threshold out of order)."""
    shared = Path(workdir).resolve()
    variant_dir = shared / SWEEP_DIR / variant.name
    variant_dir.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        if not (variant_dir / stage).is_symlink():
            os.symlink(shared / stage, variant_dir / stage)
    data = variant_recipe(recipe, variant.overrides, variant_dir, budget_fraction)
    data["name"] = f"{recipe.name}-{variant.name}"  # its own artifacts and flow run names
    data["train"]["devices"] = devices
    path = variant_dir / "recipe.yaml"
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return load_recipe(path)


def variant_gates(recipe: Recipe, workdir: Path, evaluation: dict, manifest: Manifest) -> list[dict]:
    """The audit's gates that a pilot variant can be judged on, computed as the audit computes
    them: all but lineage and above_previous_version, which concern a published full run."""
    return [
        *accuracy_gates(recipe, evaluation, None),
        *loss_gates(recipe, evaluation),
        contamination_gate(recipe, Path(workdir), manifest.drawn_sources()),
        health_gate(recipe, train.training_logs(Path(workdir))),
    ]


def result_row(recipe: Recipe, variant: Variant, trained: dict, evaluation: dict, workdir: Path) -> dict:
    """One line of the results table: the score the audit counts (weighted average of each
    benchmark's counted metric), both metrics, losses, cost and every gate's verdict."""
    manifest = mix.read_manifest(Path(workdir))
    gates = variant_gates(recipe, workdir, evaluation, manifest)
    scores = judged_scores(recipe, evaluation)
    validation = evaluation["validation"]
    hours = trained["seconds"] * trained["processes"] / 3600
    average = scores["average"]
    return {
        "variant": variant.name,
        "kind": variant.kind,
        "description": variant.description,
        "status": "ok",
        "overrides": variant.overrides,
        "estimator": scores["estimator"],
        "score": average["candidate"] if average else None,
        "score_stderr": average["candidate_stderr"] if average else None,
        "score_gain": average["delta"] if average else None,
        "average_by_metric": {m: (scores[f"average_{m}"] or {}).get("candidate") for m in METRICS},
        "benchmarks": {
            name: {"metric": b["metric"], **{m: b[m]["candidate"] for m in METRICS}}
            for name, b in scores["benchmarks"].items()
        },
        "legacy_loss": {n: v["candidate_loss_per_token"] for n, v in validation.items() if v["role"] == "legacy"},
        "new_loss": {n: v["candidate_loss_per_token"] for n, v in validation.items() if v["role"] == "new"},
        "tokens": trained["tokens"],
        "train_seconds": trained["seconds"],
        "eval_seconds": evaluation.get("seconds"),
        "device_hours": hours,
        "switches": trained["switches"],
        "gates": {g["name"]: g["passed"] for g in gates},
        "failed_gates": {g["name"]: g["reason"] for g in gates if not g["passed"]},
        "warnings": manifest.warnings,
    }


def failed_row(variant: Variant, error: str) -> dict:
    return {
        "variant": variant.name,
        "kind": variant.kind,
        "description": variant.description,
        "status": "failed",
        "overrides": variant.overrides,
        "error": error,
    }


def required_gates(recipe: Recipe) -> list[str]:
    """The gate families a winner must pass: the recipe's sweep.must_pass, else all a variant has."""
    return list(recipe.sweep.must_pass if recipe.sweep.must_pass is not None else VARIANT_GATES)


def failed_required(row: dict, required: list[str]) -> list[str]:
    """The required gates this variant failed (a gate family fails if any of its gates does)."""
    return [name for name, passed in row["gates"].items() if not passed and name.split(":")[0] in required]


def choose_winner(recipe: Recipe, rows: list[dict]) -> tuple[dict | None, str]:
    """The grid variant the recipe's rule prefers, and why (baselines are references, not candidates)."""
    rule, required = recipe.sweep, required_gates(recipe)
    measured = [r for r in rows if r["kind"] == "grid" and r["status"] == "ok" and r["score"] is not None]
    eligible = [r for r in measured if not failed_required(r, required)]
    gates_named = "every required gate (" + ", ".join(required) + ")"
    if not eligible:
        if measured:
            failures = "; ".join(f"{r['variant']} failed {', '.join(failed_required(r, required))}" for r in measured)
            return None, f"no grid variant passed {gates_named}: {failures}"
        finished = any(r["kind"] == "grid" and r["status"] == "ok" for r in rows)
        return None, "the recipe has no benchmarks to compare variants on" if finished else "no grid variant finished"
    score = (
        (lambda r: r["score"])
        if rule.select == "average_accuracy"
        else (lambda r: r["score_gain"] / max(r["device_hours"], 1e-12))
    )
    winner = max(eligible, key=score)
    reason = (
        f"{winner['variant']} ({winner['description']}) has the best "
        f"{'weighted average accuracy' if rule.select == 'average_accuracy' else 'accuracy gain per device-hour'} "
        f"({100 * winner['score']:.1f} +- {100 * (winner['score_stderr'] or 0):.1f} points, counted metrics) among "
        f"the {len(eligible)} of {len(measured)} grid variants that pass {gates_named}"
    )
    runners_up = sorted((r for r in eligible if r is not winner), key=score, reverse=True)
    if runners_up and rule.select == "average_accuracy":
        second = runners_up[0]
        lead = winner["score"] - second["score"]
        error = math.hypot(winner["score_stderr"] or 0, second["score_stderr"] or 0)
        if lead <= recipe.gates.noise_sigmas * error:
            reason += (
                f"; its lead over {second['variant']} ({100 * lead:.1f} points) is within noise "
                f"({recipe.gates.noise_sigmas:g} x {100 * error:.1f}, unpaired standard error): at this budget "
                f"the grid does not separate them"
            )
    beaten_by = [
        r["variant"]
        for r in rows
        if r["kind"] == "baseline" and r["status"] == "ok" and r["score"] is not None and r["score"] > winner["score"]
    ]
    if beaten_by:
        reason += f"; note: baseline(s) {', '.join(beaten_by)} scored higher"
    return winner, reason


def best_recipe_text(recipe: Recipe, winner: dict, reason: str, workdir: Path) -> str:
    """The winning settings as a complete recipe for the full run (full budget, the sweep's
    workdir, so it reuses the curated and tokenized data)."""
    data = variant_recipe(recipe, winner["overrides"], Path(workdir), 1.0)
    header = f"# Chosen by `refit sweep` of {recipe.name}: {reason}.\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _gate_cell(row: dict, required: list[str]) -> str:
    """'pass (N gates)' or the failed gates, required ones in bold."""
    failed = [name for name, passed in row["gates"].items() if not passed]
    if not failed:
        return f"pass ({len(row['gates'])} gates)"
    return "FAIL: " + ", ".join(f"**{n}**" if n.split(":")[0] in required else n for n in failed)


def results_markdown(
    rows: list[dict], winner: dict | None, reason: str, budget_fraction: float, required: list[str]
) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    metrics = {name: b["metric"] for r in ok for name, b in r["benchmarks"].items()}
    benchmarks = sorted(metrics)
    head = [
        "variant",
        "settings",
        "status",
        "score",
        "avg acc",
        "avg acc_norm",
        *[f"{b} ({metrics[b]})" for b in benchmarks],
        "legacy loss",
        "new loss",
        "gates",
        "tokens",
        "wall s",
        "device-hours",
    ]
    tokens = {r["tokens"] for r in ok}
    lines = [
        f"# Pilot sweep at {100 * budget_fraction:g}% of the token budget"
        + (f" ({tokens.pop():,} tokens per variant)" if len(tokens) == 1 else ""),
        "",
        f"**Winner:** {reason}." if winner else f"**No winner:** {reason}. No best recipe was written.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        mark = " **(winner)**" if winner is not None and r["variant"] == winner["variant"] else ""
        if r["status"] != "ok":
            lines.append(
                f"| {r['variant']} | {r['description']} | FAILED: {r['error'][:200]} |" + " |" * (len(head) - 3)
            )
            continue
        cells = [
            r["variant"] + mark,
            r["description"],
            "ok",
            f"{_percent(r['score'])} +- {_percent(r['score_stderr'] or 0)}",
            _percent(r["average_by_metric"]["acc"]),
            _percent(r["average_by_metric"]["acc_norm"]),
            *[_percent(r["benchmarks"][b][metrics[b]]) if b in r["benchmarks"] else "" for b in benchmarks],
            ", ".join(f"{v:.3f}" for v in r["legacy_loss"].values()),
            ", ".join(f"{v:.3f}" for v in r["new_loss"].values()),
            _gate_cell(r, required),
            f"{r['tokens']:,}",
            f"{r['train_seconds'] + (r['eval_seconds'] or 0):.0f}",
            f"{r['device_hours']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [(r["variant"], name, why) for r in ok for name, why in r.get("failed_gates", {}).items()]
    if failures:  # the gain gate's says which benchmarks make its noise and what would decide
        lines += ["", "Why gates failed:", ""] + [f"- {variant}: {name}: {why}" for variant, name, why in failures]
    warned = [(r["variant"], w) for r in ok for w in r.get("warnings", [])]
    if warned:
        lines += ["", "Warnings (data mix):", ""] + [f"- {variant}: {warning}" for variant, warning in warned]
    lines += [
        "",
        "Score: the average of each benchmark's counted metric (named in its column) under gates.gain_estimator "
        f"{', '.join(sorted({r.get('estimator', 'equal') for r in ok})) or '-'}, as the audit's gain gate counts "
        "it, in points with its standard error; "
        "avg acc and avg acc_norm: the same weights, "
        "one metric everywhere. Gates: the audit's, computed per variant at this budget; a winner must pass "
        f"those in bold ({', '.join(required)}). Losses in nats per token on held-out documents; wall time is "
        "training plus evaluation; device-hours count training only.",
        "",
        "![accuracy against compute](accuracy_vs_compute.png)",
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_compute(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in (r for r in rows if r["status"] == "ok" and r["score"] is not None):
        marker, color = ("s", "tab:gray") if r["kind"] == "baseline" else ("o", "tab:blue")
        ax.errorbar(
            r["device_hours"],
            100 * r["score"],
            yerr=100 * (r["score_stderr"] or 0),
            fmt=marker,
            color=color,
            capsize=3,
        )
        ax.annotate(
            r["variant"],
            (r["device_hours"], 100 * r["score"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("training device-hours")
    ax.set_ylabel("score: weighted average accuracy, counted metrics (points)")
    ax.set_title("Pilot sweep: accuracy against compute (squares: baselines)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, out)
    plt.close(fig)


def write_results(
    sweep_dir: Path,
    recipe: Recipe,
    rows: list[dict],
    winner: dict | None,
    reason: str,
    budget_fraction: float,
    workdir: Path,
) -> dict:
    """results.json, results.md, accuracy_vs_compute.png and, with a winner, <name>.best.yaml
    (without one, a best recipe of an earlier sweep is removed: it would name a loser)."""
    sweep_dir = Path(sweep_dir)
    required = required_gates(recipe)
    plot_accuracy_vs_compute(rows, sweep_dir / "accuracy_vs_compute.png")
    write_text_atomic(sweep_dir / "results.md", results_markdown(rows, winner, reason, budget_fraction, required))
    best = sweep_dir / f"{recipe.name}.best.yaml"
    if winner is not None:
        write_text_atomic(best, best_recipe_text(recipe, winner, reason, workdir))
    else:
        best.unlink(missing_ok=True)
    summary = {
        "recipe": recipe.name,
        "budget_fraction": budget_fraction,
        "required_gates": required,
        "rows": rows,
        "winner": winner["variant"] if winner else None,
        "reason": reason,
        "best_recipe": str(best) if winner else None,
    }
    write_text_atomic(sweep_dir / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary
