"""publish: an audited checkpoint into the registry as `<model>/vNNNN/`, all or nothing.

The registry is a local folder or any fsspec URL. A version is assembled in
`<model>/vNNNN.partial/` and renamed into place once complete, with `SHA256SUMS` written
last; `<model>/latest` (a one-line file naming the version) is then replaced atomically.
Readers see only complete versions. A killed publish leaves a `.partial` folder that the
next run removes; publishing the same audited checkpoint again returns its version.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import yaml

from refit.stages import audit, curate, evaluate, mix, train
from refit.stages.lib.config import Recipe
from refit.stages.lib.contract import Stage
from refit.stages.lib.markers import (
    code_version,
    file_sha256,
    fingerprint,
    staged_output,
    write_json_atomic,
    write_marker,
)

FOLDER = "publish"
VERSION = re.compile(r"^v(\d{4,})$")
RECORD = "refit_publish.json"


class PublishRefused(RuntimeError):
    """The checkpoint may not be published (failed or foreign audit); nothing was written."""


def _filesystem(url: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def _write(fs, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
    fs.pipe_file(path, data)


def versions(fs, model_root: str) -> list[str]:
    """Complete versions, oldest first."""
    if not fs.exists(model_root):
        return []
    names = [Path(p.rstrip("/")).name for p in fs.ls(model_root, detail=False)]
    return sorted((n for n in names if VERSION.match(n)), key=lambda n: int(n[1:]))


def _check_audit(workdir: Path) -> dict:
    """The audit report, if it passed and was made for exactly the checkpoint on disk."""
    trained = train.run_fingerprint(workdir)
    if trained is None or not audit.STAGE.output(workdir).joinpath("_SUCCESS.json").is_file():
        raise PublishRefused(f"no finished audit and training in {workdir}: run `refit stage audit` first")
    report = audit.read_report(workdir)
    if not report["passed"]:
        raise PublishRefused("the audit failed; refusing to publish:\n  - " + "\n  - ".join(report["failed"]))
    if report["lineage"]["train_fingerprint"] != trained:
        raise PublishRefused(
            "the audit was made for another training run than the one on disk: rerun evaluate and audit"
        )
    model = train.final_model(workdir)
    for name, digest in train.final_model_sha256(workdir).items():
        if file_sha256(model / name) != digest:
            raise PublishRefused(
                f"{model / name} changed after training and audit (sha256 differs): rerun the pipeline"
            )
    return report


def model_card(recipe: Recipe, report: dict, manifest: dict) -> str:
    results = [
        {
            "task": {"type": "multiple-choice", "name": "multiple-choice"},
            "dataset": {"name": name, "type": name},
            "metrics": [
                {"type": "acc", "name": "accuracy", "value": round(100 * b["acc"]["candidate"], 2)},
                {
                    "type": "acc_norm",
                    "name": "normalised accuracy",
                    "value": round(100 * b["acc_norm"]["candidate"], 2),
                },
            ],
        }
        for name, b in report["scores"]["benchmarks"].items()
    ]
    metadata = {
        "license": recipe.publish.license,
        "base_model": recipe.base_model.path,
        "library_name": "transformers",
        "datasets": [s.name for s in recipe.sources],
        "tags": ["refit", "continued-pretraining"],
        "model-index": [{"name": recipe.model_name, "results": results}],
    }
    phases = "; ".join(
        f"{p['name']} from step {p['start_step']} ({', '.join(f'{k} {v:.0%}' for k, v in p['weights'].items())})"
        for p in manifest["phases"]
    )
    gates = "\n".join(f"| {g['name']} | {'pass' if g['passed'] else 'FAIL'} | {g['reason']} |" for g in report["gates"])
    rows = "\n".join(
        f"| {name} | {b['domain']} | {metric}{' (counted)' if metric == b['metric'] else ''} | "
        f"{100 * b[metric]['base']:.1f} | {100 * b[metric]['candidate']:.1f} | "
        f"{100 * b[metric]['delta']:+.1f} +- {100 * (b[metric]['delta_stderr'] or 0):.1f} |"
        for name, b in report["scores"]["benchmarks"].items()
        for metric in ("acc", "acc_norm")
    )
    cost = report["cost"]
    prose = f"""# {recipe.model_name}

{recipe.description or "A language model refreshed by continued pretraining with Refit."}

## Intended use

A refresh of `{recipe.base_model.path}` that adds the knowledge of its new sources while keeping
what the base model knew. Use it where the base model was used; it passed every audit gate below.
It was not tuned for instructions or safety beyond what the base model had.

## Data

Sources: {", ".join(f"{s.name} ({s.role})" for s in recipe.sources)}. Curated (validated, deduplicated
within and across sources, decontaminated against the benchmarks), tokenized into {manifest["seq_len"]}-token
sequences. Tokens drawn: {", ".join(f"{k} {v['drawn_tokens']:,}" for k, v in manifest["sources"].items())}.

## Recipe

Continued pretraining ("Reuse, Don't Retrain", Parmar et al. 2024): {manifest["total_steps"]} steps,
{manifest["total_tokens"]:,} tokens, {manifest["schedule"]["decay"]} schedule from {manifest["schedule"]["max_lr"]:.2e}
to {manifest["schedule"]["min_lr_ratio"]:g} x max_lr, warmup {manifest["schedule"]["warmup_steps"]} steps.
Data phases, each later one triggered by the learning rate: {phases}.

## Results (base against this model)

Accuracy in points, difference with its paired standard error. The audit counts, per benchmark,
the metric marked "counted" (acc: highest log-likelihood; acc_norm: highest per character).

| benchmark | domain | metric | base | this model | difference |
|---|---|---|---|---|---|
{rows}

## Audit gates

| gate | result | detail |
|---|---|---|
{gates}

## Cost

{cost["tokens"]:,} training tokens, {cost["flops"]:.3g} FLOPs, {cost["device_hours"]:.4g} device-hours
({cost["cost"]:.4g} at {cost["price_per_device_hour"]:g} per device-hour).
"""
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + prose


def published_records(recipe: Recipe) -> list[dict]:
    """The publish records of every complete version of the recipe's model, newest first,
    each with its `version` and `path` in the registry."""
    fs, registry = _filesystem(recipe.publish.registry)
    model_root = f"{registry}/{recipe.model_name}"
    records = []
    for version in reversed(versions(fs, model_root)):
        path = f"{model_root}/{version}"
        if fs.exists(f"{path}/{RECORD}"):
            records.append({**json.loads(fs.cat_file(f"{path}/{RECORD}")), "version": version, "path": path})
    return records


def read_published(recipe: Recipe, version_path: str, name: str) -> bytes:
    fs, _ = _filesystem(recipe.publish.registry)
    return fs.cat_file(f"{version_path}/{name}")


def local_checkpoint(recipe: Recipe, record: dict, cache: Path) -> Path:
    """A published version as a local folder: itself in a local registry, else a copy under cache."""
    fs, _ = _filesystem(recipe.publish.registry)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return Path(record["path"])
    target = Path(cache) / record["version"]
    if not target.is_dir():  # fetched into .partial, renamed once complete
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted fetch
        fs.get(record["path"] + "/", str(partial), recursive=True)
        partial.rename(target)
    return target


def identity(recipe: Recipe, workdir: Path) -> str:
    """The weights (sha256 of every file the training exported) and where they go: the same
    weights are never published twice, however often evaluate and audit rerun."""
    if train.run_fingerprint(workdir) is None:
        raise PublishRefused(f"no finished training in {workdir}: run `refit stage train` first")
    weights = {f"final/{name}": digest for name, digest in train.final_model_sha256(workdir).items()}
    where = {"registry": recipe.publish.registry, "model": recipe.model_name, "weights": weights}
    return hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()


def input_fingerprint(recipe: Recipe, workdir: Path) -> str:
    """The weights and the audit that passed them."""
    upstream = [audit.STAGE.produced(workdir, "publish")]
    return fingerprint("publish", {"identity": identity(recipe, workdir)}, upstream, code_version(__name__))


def _report(identity_: str, version: str, path: str, already: bool) -> dict:
    return {"stage": "publish", "version": version, "path": path, "already_published": already, "identity": identity_}


def run_publish(recipe: Recipe, workdir: Path, force: bool = False) -> dict:
    """Publish the audited checkpoint; returns {version, path, ...} and records it in
    `<workdir>/publish/`. A checkpoint already in the registry is never written twice, with
    or without `force`."""
    workdir = Path(workdir)
    report = _check_audit(workdir)
    data_version = curate.curated_data_version(workdir)
    if data_version is None:
        raise PublishRefused(f"no finished curate stage in {workdir}: the published version could not name its data")
    weights_identity, expected = identity(recipe, workdir), input_fingerprint(recipe, workdir)
    for record in published_records(recipe):
        if record["identity"] == weights_identity:
            return _record_in_workdir(
                workdir, expected, _report(weights_identity, record["version"], record["path"], True)
            )
    fs, registry = _filesystem(recipe.publish.registry)
    model_root = f"{registry}/{recipe.model_name}"
    fs.makedirs(model_root, exist_ok=True)
    for stale in fs.glob(f"{model_root}/*.partial"):  # a killed publish
        fs.rm(stale, recursive=True)
    existing = versions(fs, model_root)
    version = f"v{(int(existing[-1][1:]) + 1 if existing else 1):04d}"
    partial, final = f"{model_root}/{version}.partial", f"{model_root}/{version}"
    manifest = mix.read_manifest(workdir)
    files: dict[str, bytes | Path] = {p.name: p for p in sorted(train.final_model(workdir).iterdir()) if p.is_file()}
    files.update({f"audit/{p.name}": p for p in sorted(audit.STAGE.output(workdir).iterdir()) if p.is_file()})
    files["manifest.json"] = mix.manifest_path(workdir)
    files["eval_report.json"] = evaluate.report_path(workdir)
    files["README.md"] = model_card(recipe, report, manifest).encode()
    files[RECORD] = json.dumps(
        {
            "identity": weights_identity,
            "version": version,
            "published": time.time(),
            "train_fingerprint": train.run_fingerprint(workdir),
            "recipe": recipe.name,
            "base_model": str(recipe.base_model.path),
            "data_version": data_version,
        },
        indent=2,
    ).encode()
    sums = []
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.read_bytes()
        _write(fs, f"{partial}/{name}", data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    _write(fs, f"{partial}/SHA256SUMS", ("\n".join(sums) + "\n").encode())  # last: the version is complete
    fs.mv(partial, final, recursive=True)
    _write(fs, f"{model_root}/latest.tmp", (version + "\n").encode())
    fs.mv(f"{model_root}/latest.tmp", f"{model_root}/latest")
    return _record_in_workdir(
        workdir, expected, {**_report(weights_identity, version, final, False), "files": len(files) + 1}
    )


def still_published(recipe: Recipe, workdir: Path) -> bool:
    """Whether the version this workdir recorded as published is still complete in the registry."""
    record = Path(workdir) / FOLDER / "report.json"
    if not record.is_file():
        return False
    fs, _ = _filesystem(recipe.publish.registry)
    return fs.exists(f"{json.loads(record.read_text())['path']}/SHA256SUMS")


def _record_in_workdir(workdir: Path, expected: str, report: dict) -> dict:
    """`<workdir>/publish/report.json` and its done marker: what this workdir published where."""
    started = time.time()
    with staged_output(Path(workdir) / FOLDER) as out:
        write_json_atomic(out / "report.json", report)
        write_marker(out, "publish", expected, started, code_version(__name__))
    return report


STAGE = Stage(
    name="publish",
    reads=("audit", "train", "mix", "evaluate", "curate"),
    sections=("publish",),
    folder=FOLDER,
    run_function=run_publish,
    fingerprint_function=input_fingerprint,
)
