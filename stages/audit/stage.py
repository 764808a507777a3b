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
from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

from refit.stages.audit.gates import (
    Gate,
    accuracy_gates,
    contamination_gate,
    health_gate,
    lineage_gate,
    loss_gates,
    validation_warnings,
)
from refit.stages.audit.report import write_report
from refit.stages.audit.safety_gates import safety_gates
from refit.stages.core.config import Recipe
from refit.stages.core.contract import Stage
from refit.stages.core.markers import (
    code_version,
    file_sha256,
    fingerprint,
    is_done,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.core.scores import judged_scores
from refit.stages.evaluate import stage as evaluate
from refit.stages.mix import stage as mix
from refit.stages.mix.manifest import Manifest
from refit.stages.train import stage as train

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
        "code_version": code_version(train.__name__),  # of the training code
        "train_fingerprint": train.run_fingerprint(workdir),
    }


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


def run_audit(recipe: Recipe, workdir: Path, force: bool = False, previous_eval: dict | None = None) -> AuditReport:
    """Write audit/report.json and audit/report.md with plots; raise AuditFailed if a gate fails."""
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
            contamination_gate(recipe, workdir, manifest.drawn_sources()),
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
            "warnings": manifest.warnings + validation_warnings(recipe, evaluation),
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
    reads=("curate", "mix", "train", "evaluate"),  # curate: the contamination gate reads curated documents
    sections=("gates", "cost"),
    folder=FOLDER,
    report=AuditReport,
    summarize=summary,
    run_function=run_audit,
    fingerprint_function=input_fingerprint,
    takes=("previous_eval",),
)
