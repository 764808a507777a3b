"""publish: an audited checkpoint into the registry as `<model>/vNNNN/`, all or nothing.

The registry is a local folder or any fsspec URL (`s3://`, `gs://`, `file://`, `memory://`);
reports and records name published versions by URL, with the protocol the recipe gave. One
model's folder holds:

  vNNNN.claim     the version number taken by one publisher, created exclusively (fsspec
                  mode "xb": O_EXCL locally, a conditional write on object stores), so two
                  publishers, on any machines, never take the same number; removed once the
                  version is complete
  vNNNN.partial/  the version being written, each file streamed and hashed as it is copied
  vNNNN/          the version, renamed into place; complete once its `SHA256SUMS` is written,
                  after the rename (on object stores a rename is copy-then-delete, so a half
                  copied `vNNNN/` exists for a while: only versions with `SHA256SUMS` count)
  latest          one line naming the newest complete version

Writers need no lock and may run concurrently: numbers are claimed, and every publisher ends
by pointing `latest` at the newest complete version, rereading it after each write, so the
last writer leaves it right. A publish killed at any point is finished by the next run of
the same weights: it takes up its own claim again (the version gets the number an
uninterrupted run gives it), and a version completed but not yet named by `latest` gets
`latest` repaired. A claim left by a publisher that never reruns keeps its number, and its
`.partial` folder, until removed by hand; the same weights published from two workdirs at the
same moment are not supported (the second takes up the first's claim). Publishing the same
weights again returns their version.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import yaml
from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict

from refit.stages.audit import stage as audit
from refit.stages.audit.safety_gates import model_card_section
from refit.stages.core.config import Recipe
from refit.stages.core.contract import Stage
from refit.stages.core.markers import (
    file_sha256,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.core.paths import inside
from refit.stages.core.remote_code import foreign_code_references
from refit.stages.curate import stage as curate
from refit.stages.evaluate import stage as evaluate
from refit.stages.mix import stage as mix
from refit.stages.mix.manifest import Manifest
from refit.stages.train import stage as train

FOLDER = "publish"
VERSION = re.compile(r"^v(\d{4,})$")
TAKEN = re.compile(r"^v(\d{4,})(\.claim|\.partial)?$")  # a number in use, complete or not
RECORD = "refit_publish.json"
SUMS = "SHA256SUMS"  # written last, after the rename: the version is complete
COPY_CHUNK = 1 << 20


@with_config(ConfigDict(extra="forbid"))
class PublishReport(TypedDict):
    stage: str
    version: str
    path: str
    already_published: bool
    identity: str  # of the weights and the audit that passed them
    files: NotRequired[int]  # files written, when this run published the version


class PublishRefused(RuntimeError):
    """The checkpoint may not be published (failed or foreign audit); nothing was written."""


class Registry:
    """One model's folder in the registry: its fsspec filesystem, its path there and its URL
    as the recipe wrote it (what reports and records show)."""

    def __init__(self, recipe: Recipe):
        import fsspec

        registry = recipe.publish.registry
        self.fs, root = fsspec.core.url_to_fs(registry)
        self.root = inside(root.rstrip("/") or self.fs.root_marker, recipe.model_name)
        self.url = f"{registry.rstrip('/')}/{recipe.model_name}"

    def path(self, name: str) -> str:
        return inside(self.root, name)

    def url_of(self, version: str) -> str:
        return f"{self.url}/{version}"

    def names(self) -> list[str]:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)] if self.exists() else []

    def exists(self, name: str | None = None) -> bool:
        return self.fs.exists(self.root if name is None else self.path(name))

    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        found = (n for n in self.names() if VERSION.match(n) and self.exists(f"{n}/{SUMS}"))
        return sorted(found, key=lambda n: int(n[1:]))

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name), recursive=True)

    def claim(self, identity: str) -> str:
        """A version number for these weights: the one a killed publish of them claimed, else
        the next free one, taken by creating `vNNNN.claim` exclusively."""
        names = self.names()
        for name in names:
            if name.endswith(".claim") and _claimed_for(self.read(name)) == identity:
                version = name.removesuffix(".claim")
                self.remove(f"{version}.partial")  # written by the killed run, maybe in part
                self.remove(version)  # renamed in part (object stores) or not yet complete
                return version
        number = max((int(m.group(1)) for n in names if (m := TAKEN.match(n))), default=0) + 1
        holder = {"identity": identity, "host": socket.gethostname(), "pid": os.getpid()}
        while True:
            version = f"v{number:04d}"
            if self._create_exclusive(f"{version}.claim", json.dumps({**holder, "claimed": time.time()}).encode()):
                if not (self.exists(version) or self.exists(f"{version}.partial")):
                    return version
                self.remove(f"{version}.claim")  # completed (its claim gone) since we listed: not ours
            number += 1

    def _create_exclusive(self, name: str, data: bytes) -> bool:
        self.fs.makedirs(self.root, exist_ok=True)  # a no-op on object stores
        try:
            with self.fs.open(self.path(name), "xb") as out:  # on object stores, checked when closing
                out.write(data)
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError) as error:
            raise PublishRefused(
                f"the registry {self.url} cannot create a file exclusively (fsspec mode 'xb'), which "
                f"publishing needs to claim a version number: {error}"
            ) from None
        return True

    def write_version(self, version: str, files: dict[str, Path | bytes]) -> str:
        """Stream files into `vNNNN.partial/`, rename it into place, write `SHA256SUMS`, drop
        the claim; returns the version's URL."""
        partial, final = self.path(f"{version}.partial"), self.path(version)
        try:
            sums = [f"{_stream(content, self.fs, inside(partial, name))}  {name}" for name, content in files.items()]
            self.fs.mv(partial, final, recursive=True)
            _stream(("\n".join(sums) + "\n").encode(), self.fs, inside(final, SUMS))
        except Exception:  # a full disk, a lost connection: take back what never became a version
            with contextlib.suppress(Exception):
                for name in (f"{version}.partial", version, f"{version}.claim"):
                    self.remove(name)
            raise
        self.remove(f"{version}.claim")
        return self.url_of(version)

    def latest(self) -> str | None:
        """What `latest` names (whatever it holds), None without one."""
        return self.read("latest").decode(errors="replace").strip() if self.exists("latest") else None

    def point_latest(self) -> str:
        """Make `latest` name the newest complete version, and return that version. Each
        publisher rereads after writing, so concurrent publishers converge on the newest."""
        while True:
            newest = self.versions()[-1]
            if self.latest() == newest:
                return newest
            for stale in self.names():  # a killed writer's; a live one's mv then fails and retries
                if stale.startswith("latest.") and stale.endswith(".tmp"):
                    self.remove(stale)
            tmp = self.path(f"latest.{uuid.uuid4().hex}.tmp")
            _stream(f"{newest}\n".encode(), self.fs, tmp)
            try:
                self.fs.mv(tmp, self.path("latest"))
            except FileNotFoundError:  # removed by another publisher as stale: read again
                continue

    def tidy(self, version: str) -> None:
        """The claim and partial folder of a complete version, left by a publish killed after
        writing its `SHA256SUMS`."""
        self.remove(f"{version}.claim")
        self.remove(f"{version}.partial")


def _claimed_for(claim: bytes) -> str | None:
    """The identity a claim was made for; None while its publisher is still writing it (or
    was killed doing so: that number stays taken)."""
    try:
        return json.loads(claim).get("identity")
    except json.JSONDecodeError:
        return None


def _stream(content: Path | bytes, fs, path: str) -> str:
    """Copy a local file (or bytes) to path on fs in chunks; the sha256 of what was sent."""
    digest = hashlib.sha256()
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
    with open(content, "rb") if isinstance(content, Path) else io.BytesIO(content) as source:
        with fs.open(path, "wb") as out:
            while block := source.read(COPY_CHUNK):
                digest.update(block)
                out.write(block)
    return digest.hexdigest()


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


def soup_card_section(report: dict) -> str:
    """With anneal ingredients: the averaging rule and every ingredient (its weights' sha256, its
    counted average and held-out loss), and the soup against the best and the mean ingredient."""
    soup, record = report.get("soup"), report["lineage"].get("soup")
    if not soup or not record:
        return ""
    judged = {i["index"]: i for i in soup["ingredients"]}
    rows = []
    for ingredient in record["ingredients"]:
        index, loss = ingredient["index"], ingredient["val_loss"]
        average = judged[index]["average"]
        rows.append(
            f"| {index}{' (best)' if index == soup['best'] else ''} | {'yes' if index in record['kept'] else 'no'} | "
            f"{'' if average is None else f'{100 * average:.1f}'} | {'' if loss is None else f'{loss:.4f}'} | "
            + ", ".join(f"{name} `{digest}`" for name, digest in ingredient["weights_sha256"].items())
            + " |"
        )
    compared = [
        f"{label}: {100 * average['delta']:+.1f} +- {100 * (average['delta_stderr'] or 0):.1f} points"
        for label, key in ((f"the best ingredient ({soup['best']})", "vs_best"), ("their mean", "vs_mean"))
        if (average := soup["average"][key]) is not None
    ]
    table = "\n".join(rows)
    return f"""
## Soup

This model is a {record["method"]} soup (Wortsman et al., 2022): {record["rule"]}. The run was
trained once up to step {record["branch_step"]}, where its last data phase starts; from there each
of {len(record["ingredients"])} ingredients trained that phase in a data order of its own
(ingredient 0 continuing the shared run).

| ingredient | in the soup | counted average (points) | held-out loss in training | weights (sha256) |
|---|---|---|---|---|
{table}

The soup's counted average against {"; against ".join(compared) or "its ingredients: not measured"}
(paired standard errors; the best ingredient was picked on the same items).
"""


def model_card(recipe: Recipe, report: dict, manifest: Manifest, evaluation: dict) -> str:
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
        f"{p.name} from step {p.start_step} ({', '.join(f'{k} {v:.0%}' for k, v in p.weights.items())})"
        for p in manifest.phases
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
within and across sources, decontaminated against the benchmarks), tokenized into {manifest.seq_len}-token
sequences. Tokens drawn: {", ".join(f"{k} {v.drawn_tokens:,}" for k, v in manifest.sources.items())}.

## Recipe

Continued pretraining ("Reuse, Don't Retrain", Parmar et al. 2024): {manifest.total_steps} steps,
{manifest.total_tokens:,} tokens, {manifest.schedule.decay} schedule from {manifest.schedule.max_lr:.2e}
to {manifest.schedule.min_lr_ratio:g} x max_lr, warmup {manifest.schedule.warmup_steps} steps.
Data phases, each later one triggered by the learning rate: {phases}.
{soup_card_section(report)}
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

{model_card_section(evaluation)}

## Cost

{cost["tokens"]:,} training tokens, {cost["flops"]:.3g} FLOPs, {cost["device_hours"]:.4g} device-hours
({cost["cost"]:.4g} at {cost["price_per_device_hour"]:g} per device-hour).
"""
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + prose


def published_records(recipe: Recipe) -> list[dict]:
    """The publish records of every complete version of the recipe's model, newest first,
    each with its `version` and `path` (URL) in the registry."""
    registry = Registry(recipe)
    records = []
    for version in reversed(registry.versions()):
        if registry.exists(f"{version}/{RECORD}"):
            record = json.loads(registry.read(f"{version}/{RECORD}"))
            records.append({**record, "version": version, "path": registry.url_of(version)})
    return records


def read_published(recipe: Recipe, version_path: str, name: str) -> bytes:
    return Registry(recipe).fs.cat_file(f"{version_path}/{name}")


def local_checkpoint(record: dict, cache: Path) -> Path:
    """A published version (its record's `path` URL and `version`) as a local folder: itself
    in a local registry, else a copy under cache."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(record["path"])
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return Path(path)
    target = inside(Path(cache), record["version"])  # a version name, never a path out of the cache
    if not target.is_dir():  # fetched into .partial, renamed once complete
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted fetch
        fs.get(path + "/", str(partial), recursive=True)
        partial.rename(target)
    return target


def published_origin(checkpoint: str | Path) -> tuple[str, str | None]:
    """Where a base checkpoint comes from: the registry URL and version of a published version
    (a local copy of one carries its publish record), else its own path and None. Records
    name the URL, which every worker can reach, not a local copy only this one has."""
    record_file = Path(checkpoint) / RECORD
    if record_file.is_file() and "url" in (record := json.loads(record_file.read_text())):
        return record["url"], record["version"]
    return str(checkpoint), None


def identity(recipe: Recipe, workdir: Path) -> str:
    """The weights (sha256 of every file the training exported) and where they go: the same
    weights are never published twice, however often evaluate and audit rerun."""
    if train.run_fingerprint(workdir) is None:
        raise PublishRefused(f"no finished training in {workdir}: run `refit stage train` first")
    weights = {f"final/{name}": digest for name, digest in train.final_model_sha256(workdir).items()}
    where = {"registry": recipe.publish.registry, "model": recipe.model_name, "weights": weights}
    return hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()


def _report(identity_: str, version: str, path: str, already: bool) -> dict:
    return {"stage": "publish", "version": version, "path": path, "already_published": already, "identity": identity_}


def run_publish(recipe: Recipe, workdir: Path, force: bool = False) -> PublishReport:
    """Publish the audited checkpoint; returns {version, path, ...} and records it in
    `<workdir>/publish/`. A checkpoint already in the registry is never written twice, with
    or without `force`; `latest` is repaired either way."""
    workdir = Path(workdir)
    report = _check_audit(workdir)
    data_version = curate.curated_data_version(workdir)
    if data_version is None:
        raise PublishRefused(f"no finished curate stage in {workdir}: the published version could not name its data")
    weights_identity, expected = identity(recipe, workdir), STAGE.input_fingerprint(recipe, workdir)
    if foreign := foreign_code_references(train.final_model(workdir)):
        named = "; ".join(f"{name}: {', '.join(refs)}" for name, refs in foreign.items())
        raise PublishRefused(
            f"{train.final_model(workdir)} maps Auto classes to code it does not contain ({named}): a consumer "
            f"loading it with trust_remote_code=True would run whatever sits beside it; retrain with this version "
            f"of Refit (`refit run RECIPE --force train`), whose export drops such maps"
        )
    registry = Registry(recipe)
    for record in published_records(recipe):
        if record["identity"] == weights_identity:
            registry.tidy(record["version"])
            registry.point_latest()  # a publish killed before naming its version in `latest`
            return _record_in_workdir(
                workdir, expected, _report(weights_identity, record["version"], record["path"], True)
            )
    version = registry.claim(weights_identity)
    manifest = mix.read_manifest(workdir)
    files: dict[str, bytes | Path] = {p.name: p for p in sorted(train.final_model(workdir).iterdir()) if p.is_file()}
    files.update({f"audit/{p.name}": p for p in sorted(audit.STAGE.output(workdir).iterdir()) if p.is_file()})
    files["manifest.json"] = mix.manifest_path(workdir)
    files["eval_report.json"] = evaluate.report_path(workdir)
    files["README.md"] = model_card(recipe, report, manifest, evaluate.read_report(workdir)).encode()
    base_model, base_version = published_origin(recipe.base_model.path)
    files[RECORD] = json.dumps(
        {
            "identity": weights_identity,
            "version": version,
            "url": registry.url_of(version),
            "published": time.time(),
            "train_fingerprint": train.run_fingerprint(workdir),
            "recipe": recipe.name,
            "base_model": base_model,
            "base_version": base_version,
            "data_version": data_version,
        },
        indent=2,
    ).encode()
    url = registry.write_version(version, files)
    registry.point_latest()
    return _record_in_workdir(
        workdir, expected, {**_report(weights_identity, version, url, False), "files": len(files) + 1}
    )


def still_published(recipe: Recipe, workdir: Path) -> bool:
    """Whether the version this workdir recorded as published is still complete in the registry
    and `latest`, the one thing consumers read, names the newest complete version: else publish
    runs again, which repairs the pointer without writing the version twice."""
    record = Path(workdir) / FOLDER / "report.json"
    registry = Registry(recipe)
    if not record.is_file() or not registry.fs.exists(f"{json.loads(record.read_text())['path']}/{SUMS}"):
        return False
    return registry.latest() == registry.versions()[-1]


def _record_in_workdir(workdir: Path, expected: str, report: dict) -> dict:
    """`<workdir>/publish/report.json` and its done marker: what this workdir published where."""
    started = time.time()
    with staged_output(Path(workdir) / FOLDER) as out:
        write_json_atomic(out / "report.json", report)
        write_marker(out, "publish", expected, started, STAGE.code_version)
    return report


STAGE = Stage(
    name="publish",
    reads=(audit.STAGE, train.STAGE, mix.STAGE, evaluate.STAGE, curate.STAGE),
    # the registry and the model's name there; for the model card and the record, the rest
    recipe_reads=("publish", "name", "description", "sources", "base_model.path"),
    folder=FOLDER,
    report=PublishReport,
    run_function=run_publish,
    still_holds=still_published,
)
