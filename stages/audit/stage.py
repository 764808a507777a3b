"""audit: every gate, the cost report and the lineage, in `<workdir>/audit/`.

Gates return {name, passed, value, threshold, reason}, all evaluated, all reported. Small
models give noisy numbers, so every gate on a measured difference is noise-aware with
`gates.noise_sigmas` standard errors (paired, from the evaluate stage):
  * an improvement must be shown beyond noise: value - sigmas x stderr must clear the bar;
  * a regression fails only when shown beyond noise: value + sigmas x stderr must cross it.
A failed audit still writes its reports (and done marker), then raises AuditFailed.

With anneal ingredients (#26) the candidate is their soup, so every gate reads the soup; the
report adds the soup against the best ingredient and the mean of the ingredients (`soup`, as
stages/audit/soup.py counts it), the lineage lists every ingredient's weights and the
averaging rule, and the cost counts the shared prefix once and each ingredient's anneal once.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict

from refit.stages.audit.gates import (
    Gate,
    accuracy_gates,
    contamination_gate,
    health_gate,
    lineage_gate,
    loss_gates,
    loss_spikes,
    validation_warnings,
)
from refit.stages.audit.report import write_report
from refit.stages.audit.safety_gates import safety_gates
from refit.stages.audit.soup import judged_soup
from refit.stages.core.config import Recipe
from refit.stages.core.contract import Stage, StageOptions
from refit.stages.core.markers import (
    file_sha256,
    is_done,
    read_marker,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.core.scores import judged_scores
from refit.stages.curate import stage as curate
from refit.stages.evaluate import stage as evaluate
from refit.stages.mix import stage as mix
from refit.stages.mix.manifest import Manifest
from refit.stages.train import stage as train
from refit.stages.train.layout import SOUP

FOLDER = "audit"


@with_config(ConfigDict(extra="forbid"))
class AuditReport(TypedDict):
    stage: str
    recipe: str
    passed: bool
    gates: list[Gate]
    failed: list[str]  # the reason of every failed gate
    scores: dict  # judged scores: per benchmark and the average the audit counts
    warnings: list[str]
    cost: dict
    lineage: dict
    candidate: str
    train: dict  # the train stage's report
    loss_spikes: list[dict]  # step, loss and whether it recovered, of each loss spike (gates.loss_spike_factor)
    soup: NotRequired[dict]  # with anneal ingredients: the soup against the best and the mean ingredient


class AuditFailed(RuntimeError):
    """The candidate must not ship; the message lists every failed gate."""


def lineage(recipe: Recipe, workdir: Path, manifest: Manifest) -> dict:
    base = Path(recipe.base_model.path)
    weights = {p.name: file_sha256(p) for p in sorted(base.glob("*.safetensors"))}
    shards_ok = not mix.damaged_shards(manifest, workdir)
    return {
        "base_model": str(base),
        "base_config_sha256": file_sha256(base / "config.json") if (base / "config.json").exists() else None,
        "base_weights_sha256": weights,
        "recipe_sha256": hashlib.sha256(
            json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest(),
        "manifest_sha256": manifest.sha256,
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "shards": sum(len(s.shards) for s in manifest.sources.values()),
        "shards_verified": shards_ok,
        "code_version": train.STAGE.code_version,  # of the training code
        "train_fingerprint": train.run_fingerprint(workdir),
        **({"soup": soup} if (soup := soup_lineage(workdir)) else {}),
    }


def soup_lineage(workdir: Path) -> dict | None:
    """The averaging rule of the soup (train/final/soup.json) and every ingredient: its model
    folder, the sha256 of its weight files (as the train stage's done marker recorded them, else
    hashed from its folder) and its final held-out loss; None for a run without a soup."""
    models = train.ingredient_models(workdir)
    if not models:
        return None
    final = train.final_model(workdir)
    rule = json.loads((final / SOUP).read_text())
    recorded = (read_marker(final.parent) or {}).get("outputs", {})
    ingredients = []
    for entry in rule["ingredients"]:
        model = final.parent / entry["model"]
        prefix = f"{entry['model']}/"
        weights = {
            name[len(prefix) :]: digest
            for name, digest in sorted(recorded.items())
            if name.startswith(prefix) and name.endswith(".safetensors")
        } or {p.name: file_sha256(p) for p in sorted(model.glob("*.safetensors"))}
        ingredients.append(
            {
                "index": entry["index"],
                "model": str(model.relative_to(workdir)),
                "weights_sha256": weights,
                "val_loss": entry["val_loss"],
            }
        )
    averaged = f"the uniform average of the weights of ingredients {', '.join(map(str, rule['kept']))}"
    if rule["method"] == "greedy":
        averaged += (
            f", kept by a greedy soup (tried best first by held-out loss, in the order "
            f"{', '.join(map(str, rule['order']))}, each kept only if the soup's held-out loss dropped)"
        )
    return {
        "method": rule["method"],
        "rule": averaged,
        "kept": rule["kept"],
        "branch_step": rule["branch_step"],
        "ingredients": ingredients,
    }


def cost_report(recipe: Recipe, train: dict, evaluation: dict, parameters: int) -> dict:
    """Training FLOPs and device-hours of this refresh against retraining from scratch. The
    optimizer warm-up's tokens count: their forward and backward passes cost as much. With anneal
    ingredients, the train report's tokens count the shared prefix once and each ingredient's
    anneal once (what was trained), and `soup` splits them so."""
    hours = train["seconds"] * train["processes"] / 3600
    tokens = train["tokens"] + train["optimizer_warmup_tokens"]
    tokens_per_s = tokens / max(train["seconds"], 1e-9)
    price = recipe.cost.device_hour_price
    report = {
        "parameters": parameters,
        "tokens": tokens,
        "optimizer_warmup_tokens": train["optimizer_warmup_tokens"],
        "flops": 6 * parameters * tokens,
        "wall_seconds": train["seconds"],
        "devices": train["processes"],
        "device_hours": hours,
        "price_per_device_hour": price,
        "cost": hours * price,
        "tokens_per_second": tokens_per_s,
    }
    if "soup" in train:
        report["soup"] = {
            "ingredients": len(train["ingredients"]),
            "shared_tokens": train["soup"]["shared_tokens"],
            "anneal_tokens": [i["anneal_tokens"] for i in train["ingredients"]],
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
        report["refit_over_scratch_compute"] = tokens / pretraining
    average = judged_scores(recipe, evaluation)["average"]
    if average and hours > 0:
        report["accuracy_points_per_device_hour"] = 100 * average["delta"] / hours
    return report


def run_audit(recipe: Recipe, workdir: Path, force: bool = False, previous_eval: dict | None = None) -> AuditReport:
    """Write audit/report.json and audit/report.md with plots; raise AuditFailed if a gate fails."""
    workdir = Path(workdir)
    final = workdir / FOLDER
    expected = STAGE.input_fingerprint(recipe, workdir, StageOptions(previous_eval=previous_eval))
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
            contamination_gate(recipe, workdir, manifest.drawn_sources()),
            health_gate(recipe, train.training_logs(workdir)),
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
            "warnings": manifest.warnings + validation_warnings(recipe, evaluation),
            "cost": cost_report(recipe, trained, evaluation, parameters),
            "lineage": record,
            "candidate": str(train.final_model(workdir)),
            "train": trained,
            "loss_spikes": loss_spikes(recipe, metrics),
        }
        if (soup := judged_soup(recipe, evaluation)) is not None:
            report["soup"] = soup
        with staged_output(final) as out:
            write_report(out, report, evaluation, metrics, manifest)
            write_json_atomic(out / "report.json", report)
            write_marker(out, "audit", expected, started, STAGE.code_version)
    report = read_report(workdir)
    if not report["passed"]:
        raise AuditFailed(
            f"audit of {recipe.name} failed {len(report['failed'])} gate(s):\n  - "
            + "\n  - ".join(report["failed"])
            + f"\nfull report: {report_markdown(workdir)}"
        )
    return report


def summary(report: AuditReport) -> dict:
    """What a flow keeps: the verdict, each gate's, and the cost."""
    return {
        "passed": report["passed"],
        "failed": report["failed"],
        "gates": {g["name"]: g["passed"] for g in report["gates"]},
        "cost": report["cost"],
    }


def read_report(workdir: Path) -> AuditReport:
    """The finished audit: verdict, every gate, cost, lineage."""
    return json.loads((Path(workdir) / FOLDER / "report.json").read_text())


def report_markdown(workdir: Path) -> Path:
    """The audit report for people (Markdown with its plots beside it)."""
    return Path(workdir) / FOLDER / "report.md"


def has_report(workdir: Path) -> bool:
    return (Path(workdir) / FOLDER / "report.json").is_file()


STAGE = Stage(
    name="audit",
    reads=(curate.STAGE, mix.STAGE, train.STAGE, evaluate.STAGE),  # curate: the contamination gate reads it
    recipe_reads=(
        *("gates", "cost", "evaluate", "name"),  # evaluate: the benchmarks counted, how, and the probes asked for
        *("curate.decontaminate_ngram", "curate.min_validation_tokens"),  # the contamination gate, the warnings
        *("base_model.path", "base_model.pretraining_tokens"),  # the lineage, the cost against retraining
    ),
    folder=FOLDER,
    report=AuditReport,
    summarize=summary,
    run_function=run_audit,
    takes=("previous_eval",),
)
