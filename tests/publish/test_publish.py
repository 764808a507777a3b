"""publish: complete versions or none, never twice, refused without a passing audit of this
very checkpoint; the model card reads back with huggingface_hub. The registry is tested as a
plain path, a file:// URL and fsspec's memory:// filesystem: published paths keep their
protocol, a kill at any point then a rerun leaves what an uninterrupted run leaves, two
publishers at once never share a version number, a half-moved version never counts."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import tracemalloc
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import LENIENT, prepare
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from refit.flows.continuation import continue_from, with_base
from refit.stages.audit.stage import AuditFailed, run_audit
from refit.stages.core.config import load_recipe
from refit.stages.core.markers import MARKER
from refit.stages.core.paths import PathEscape
from refit.stages.evaluate.stage import run_evaluate
from refit.stages.publish.stage import (
    RECORD,
    SUMS,
    PublishRefused,
    Registry,
    identity,
    local_checkpoint,
    published_records,
    run_publish,
    still_published,
)
from refit.stages.train.stage import run_train

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)]
KINDS = ["path", "file", "memory"]


def _audit(folder: Path, model_dir: Path, **train) -> tuple[Path, Path]:
    path, workdir = prepare(folder, model_dir, validation_fraction=0.3, gates=LENIENT, **train)
    recipe = load_recipe(path)
    for stage in (run_train, run_evaluate, run_audit):
        stage(recipe, workdir)
    return path, workdir


@pytest.fixture(scope="module")
def audited_once(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(recipe path, workdir) of a tiny run trained, evaluated and audited: tests publish copies."""
    return _audit(tmp_path_factory.mktemp("audited"), tiny_model_dir)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A second audited run, trained with another seed: other weights, for a second publisher."""
    return _audit(tmp_path_factory.mktemp("other"), tiny_model_dir, seed=1)


def copy_of(audited: tuple[Path, Path], tmp_path: Path, name: str = "wd") -> tuple[Path, Path]:
    path, workdir = audited
    shutil.copytree(workdir, tmp_path / name)
    return path, tmp_path / name


def with_registry(recipe, url: str):
    return recipe.model_copy(update={"publish": recipe.publish.model_copy(update={"registry": url})})


def registry_url(kind: str, tmp_path: Path, name: str = "registry") -> str:
    folder = tmp_path / name
    return {"path": str(folder), "file": folder.as_uri(), "memory": f"memory://{uuid.uuid4().hex}/{name}"}[kind]


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    """A recipe whose stages have not run: enough for the registry alone."""
    return load_recipe(prepare(tmp_path, tiny_model_dir, run_data_stages=False)[0])


@pytest.fixture
def audited(tmp_path, audited_once):
    """(recipe publishing to tmp_path/registry, a copy of the audited workdir)."""
    path, workdir = copy_of(audited_once, tmp_path)
    return with_registry(load_recipe(path), str(tmp_path / "registry")), workdir


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def names(url: str) -> set[str]:
    fs, root = fsspec.core.url_to_fs(f"{url}/tiny")
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()


def tree(url: str) -> dict[str, str | None]:
    """Every file of the model in the registry, with its sha256 (presence only for the publish
    record and SHA256SUMS, which hold the time of publishing)."""
    fs, root = fsspec.core.url_to_fs(f"{url}/tiny")
    files = {path[len(root) + 1 :]: path for path in fs.find(root)}
    return {name: None if name.endswith((RECORD, SUMS)) else sha256(fs.cat_file(p)) for name, p in files.items()}


def checked_files(url: str, version: str) -> set[str]:
    """The files of a version, each checked against its SHA256SUMS, which lists every one."""
    fs, root = fsspec.core.url_to_fs(f"{url}/tiny/{version}")
    listed = fs.cat_file(f"{root}/{SUMS}").decode().splitlines()
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in listed)}
    assert set(sums) == {path[len(root) + 1 :] for path in fs.find(root)} - {SUMS}
    assert all(sha256(fs.cat_file(f"{root}/{name}")) == digest for name, digest in sums.items())
    return set(sums)


def latest(url: str) -> str:
    fs, root = fsspec.core.url_to_fs(f"{url}/tiny")
    return fs.cat_file(f"{root}/latest").decode().strip()


@pytest.mark.parametrize("kind", KINDS)
def test_publishes_a_complete_version_once_and_names_it_with_its_protocol(audited, tmp_path, kind):
    recipe, workdir = audited
    url = registry_url(kind, tmp_path)
    recipe = with_registry(recipe, url)
    first = run_publish(recipe, workdir)
    assert first == {**first, "version": "v0001", "already_published": False, "path": f"{url}/tiny/v0001"}
    assert {
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "manifest.json",
        "refit_recipe.yaml",
        "audit/report.md",
        "audit/report.json",
        "audit/training.png",
        RECORD,
    } <= checked_files(url, "v0001")
    assert latest(url) == "v0001"
    (record,) = published_records(recipe)
    assert record["path"] == record["url"] == first["path"]
    assert json.loads((workdir / "publish" / "report.json").read_text())["path"] == first["path"]
    assert still_published(recipe, workdir)
    again = run_publish(recipe, workdir)
    assert (again["version"], again["path"], again["already_published"]) == ("v0001", first["path"], True)
    assert names(url) == {"latest", "v0001"}


def test_model_card_reads_back_with_huggingface_hub(audited, tmp_path):
    recipe, workdir = audited
    run_publish(recipe, workdir)
    card = ModelCard.load(tmp_path / "registry" / "tiny" / "v0001" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == recipe.base_model.path
    assert card.data.datasets == ["old", "new"]
    results = {r.metric_type: r for r in card.data.eval_results}
    evaluation = json.loads((workdir / "eval" / "report.json").read_text())
    for metric in ("acc", "acc_norm"):
        assert results[metric].dataset_name == "b"
        assert results[metric].metric_value == round(100 * evaluation["benchmarks"]["b"][metric]["candidate"], 2)
    assert "## Audit gates" in card.text and "## Intended use" in card.text and "## Cost" in card.text
    assert "## Soup" not in card.text  # trained once: no ingredients to list
    section = card.text.split("## Bias, Risks, and Limitations", 1)[1].split("\n## ", 1)[0]
    crows = evaluation["safety"]["crows_pairs"]["percent_stereotype"]
    assert f"CrowS-Pairs percent stereotype ({evaluation['safety']['crows_pairs']['pairs']} pairs" in section
    assert f"{100 * crows['base']:.1f} +- {100 * crows['base_stderr']:.1f} -> {100 * crows['candidate']:.1f}" in section
    assert "BBQ" in section and "US-English" in section and "noisy and invalid pairs" in section
    assert not re.search(r"\bfair\b", card.text, re.IGNORECASE)  # measured against the base, never called fair


# A real `run_publish` in a subprocess that SIGKILLs itself the moment it opens the named file
# for writing (an audit hook of this script, nothing in Refit), or pauses there (two publishers
# then hold their version numbers at the same time).
PUBLISH = """
import fnmatch, os, signal, sys, time
from refit.stages.core.config import load_recipe
from refit.stages.publish.stage import run_publish

recipe_path, registry, workdir, pattern, action = sys.argv[1:]
recipe = load_recipe(recipe_path)
recipe = recipe.model_copy(update={"publish": recipe.publish.model_copy(update={"registry": registry})})
reached = []

def hook(event, args):
    writing = event == "open" and isinstance(args[0], str) and args[1] and "r" not in args[1]
    if writing and not reached and fnmatch.fnmatch(args[0], pattern):
        reached.append(args[0])
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(2)

sys.addaudithook(hook)
run_publish(recipe, workdir)
"""
KILL_AT = {  # the kill point, and what is left in the model's folder
    "while-copying": ("*/v0001.partial/README.md", {"v0001.claim", "v0001.partial"}),
    "renamed-not-complete": (f"*/v0001/{SUMS}", {"v0001.claim", "v0001"}),
    "complete-before-latest": ("*/latest.*.tmp", {"v0001"}),
}


def publish_process(path: Path, url: str, workdir: Path, pattern: str, action: str) -> subprocess.Popen:
    args = [sys.executable, "-c", PUBLISH, str(path), url, str(workdir), pattern, action]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("kind", ["path", "file"])
@pytest.mark.parametrize("point", KILL_AT)
def test_a_kill_at_any_point_then_a_rerun_leaves_what_an_uninterrupted_run_leaves(audited_once, tmp_path, kind, point):
    path, workdir = copy_of(audited_once, tmp_path)
    reference = registry_url(kind, tmp_path, "reference")
    run_publish(with_registry(load_recipe(path), reference), copy_of(audited_once, tmp_path, "wd-reference")[1])
    url = registry_url(kind, tmp_path)
    recipe = with_registry(load_recipe(path), url)
    pattern, left = KILL_AT[point]
    killed = publish_process(path, url, workdir, pattern, "kill")
    output = killed.communicate(timeout=120)[0]
    assert killed.returncode == -signal.SIGKILL, output
    assert names(url) == left  # never a `latest`; a version counts once complete only
    assert [r["version"] for r in published_records(recipe)] == (["v0001"] if point == "complete-before-latest" else [])
    again = run_publish(recipe, workdir)
    assert again["version"] == "v0001" and again["path"] == f"{url}/tiny/v0001"
    assert tree(url) == tree(reference) and latest(url) == "v0001"
    checked_files(url, "v0001")


def test_a_half_moved_version_on_an_object_store_never_counts_and_the_rerun_completes_it(audited, tmp_path):
    """On object stores fs.mv copies then deletes: a kill during it leaves some files in
    v0001/ (no SHA256SUMS yet) and the rest in v0001.partial/. The memory filesystem cannot
    be killed from another process, so that state is built from a complete version."""
    recipe, workdir = audited
    reference, url = registry_url("memory", tmp_path, "reference"), registry_url("memory", tmp_path)
    run_publish(with_registry(recipe, reference), shutil.copytree(workdir, tmp_path / "wd-reference"))
    recipe = with_registry(recipe, url)
    fs, source = fsspec.core.url_to_fs(f"{reference}/tiny/v0001")
    _, root = fsspec.core.url_to_fs(f"{url}/tiny")
    claim = {"identity": identity(recipe, workdir), "host": "elsewhere", "pid": 1, "claimed": 0}
    fs.pipe_file(f"{root}/v0001.claim", json.dumps(claim).encode())
    files = sorted(p[len(source) + 1 :] for p in fs.find(source) if not p.endswith(SUMS))
    for i, name in enumerate(files):
        fs.pipe_file(f"{root}/{'v0001' if i % 2 else 'v0001.partial'}/{name}", fs.cat_file(f"{source}/{name}"))
    assert published_records(recipe) == [] and Registry(recipe).versions() == []
    assert run_publish(recipe, workdir)["version"] == "v0001"
    assert tree(url) == tree(reference) and latest(url) == "v0001"


def test_two_publishers_at_once_never_share_a_version_number_and_latest_ends_at_the_newest(
    audited_once, other_weights, tmp_path
):
    url = registry_url("file", tmp_path)
    runs = [copy_of(audited_once, tmp_path, "a"), copy_of(other_weights, tmp_path, "b")]
    # each pauses 2 s once it writes its first file, after claiming its number: both hold one at once
    processes = [publish_process(path, url, workdir, "*.partial/*", "pause") for path, workdir in runs]
    for process in processes:
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 0, output
    reports = [json.loads((workdir / "publish" / "report.json").read_text()) for _, workdir in runs]
    assert sorted(r["version"] for r in reports) == ["v0001", "v0002"]
    assert names(url) == {"latest", "v0001", "v0002"} and latest(url) == "v0002"
    for (path, workdir), report in zip(runs, reports, strict=True):
        checked_files(url, report["version"])
        recipe = with_registry(load_recipe(path), url)
        record = next(r for r in published_records(recipe) if r["path"] == report["path"])
        assert record["identity"] == report["identity"] == identity(recipe, workdir)
    # a stale `latest`, as a kill of the v0002 publisher before it wrote `latest` leaves it: its rerun repairs it
    (tmp_path / "registry" / "tiny" / "latest").write_text("v0001\n")
    (path, workdir), report = next((run, r) for run, r in zip(runs, reports, strict=True) if r["version"] == "v0002")
    assert run_publish(with_registry(load_recipe(path), url), workdir)["already_published"]
    assert latest(url) == "v0002"


def test_threads_claiming_at_once_each_get_their_own_number(recipe, tmp_path):
    registry, claimed = Registry(with_registry(recipe, registry_url("file", tmp_path))), []
    start = threading.Barrier(8)

    def claim(i: int) -> None:
        start.wait()
        claimed.extend(registry.claim(f"weights-{i}-{j}") for j in range(5))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == [f"v{n:04d}" for n in range(1, 41)]


def test_files_are_streamed_into_the_registry_not_read_whole(recipe, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as out:
        for i in range(32):
            out.write(bytes([i]) * (1 << 20))
    registry = Registry(with_registry(recipe, registry_url("path", tmp_path)))
    version = registry.claim("weights")
    tracemalloc.start()
    registry.write_version(version, {"big.bin": big})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB held while copying a 32 MiB file"
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert (tmp_path / "registry" / "tiny" / version / SUMS).read_text() == f"{digest}  big.bin\n"


def test_no_new_data_continues_from_the_base_by_its_registry_url(audited_once, other_weights, tmp_path):
    """The base of a version published from a local copy of an earlier version is recorded by
    its registry URL, so a worker without that copy continues from the same base."""
    url = registry_url("memory", tmp_path)
    first_path, first_workdir = copy_of(audited_once, tmp_path, "a")
    run_publish(with_registry(load_recipe(first_path), url), first_workdir)
    first_worker_cache = tmp_path / "worker-1" / "bases"
    (v1,) = published_records(with_registry(load_recipe(first_path), url))
    path, workdir = copy_of(other_weights, tmp_path, "b")
    recipe = with_registry(load_recipe(path), url)
    run_publish(with_base(recipe, local_checkpoint(v1, first_worker_cache)), workdir)  # v0002, from v0001
    newest = published_records(recipe)[0]
    assert (newest["version"], newest["base_model"], newest["base_version"]) == ("v0002", v1["path"], "v0001")
    shutil.rmtree(first_worker_cache)  # another worker: that copy is not there
    continued, why = continue_from(recipe, tmp_path / "worker-2")
    assert "no new data since v0002" in why
    assert Path(continued.base_model.path) == tmp_path / "worker-2" / "bases" / "v0001"
    assert (Path(continued.base_model.path) / "model.safetensors").is_file()


def test_refuses_a_failed_audit_a_changed_checkpoint_and_a_missing_curate(audited, tmp_path):
    recipe, workdir = audited
    (workdir / "curate" / MARKER).rename(workdir / "curate" / "marker.json")
    with pytest.raises(PublishRefused, match="no finished curate"):
        run_publish(recipe, workdir)
    (workdir / "curate" / "marker.json").rename(workdir / "curate" / MARKER)
    weights_file = workdir / "train" / "final" / "model.safetensors"
    weights = load_file(weights_file)
    save_file({k: v * 1.01 for k, v in weights.items()}, weights_file, metadata={"format": "pt"})
    with pytest.raises(PublishRefused, match="changed after training and audit"):
        run_publish(recipe, workdir)
    strict = recipe.model_copy(update={"gates": recipe.gates.model_copy(update={"min_average_gain": 0.5})})
    with pytest.raises(AuditFailed):
        run_audit(strict, workdir)
    with pytest.raises(PublishRefused, match="the audit failed"):
        run_publish(strict, workdir)
    assert not (tmp_path / "registry").exists()


def test_a_model_name_leaving_the_registry_is_refused(audited, tmp_path):
    """model_copy skips validation, as a recipe made in code could: the registry still refuses."""
    recipe, workdir = audited
    escaping = recipe.model_copy(update={"publish": recipe.publish.model_copy(update={"model_name": ".."})})
    with pytest.raises(PathEscape, match=r"'\.\.' would leave"):
        run_publish(escaping, workdir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wd"]


@pytest.mark.parametrize("kind", ["path", "memory"])
def test_a_crafted_record_cannot_choose_a_base_outside_the_registry(audited_once, kind, tmp_path):
    """Security: a record's base_version climbing out with `../`, or a base_model naming any
    folder, is not trusted: nothing is fetched or written outside the workdir, and the run
    continues from the recipe's own base."""
    url = registry_url(kind, tmp_path)
    path, workdir = copy_of(audited_once, tmp_path)
    recipe = with_registry(load_recipe(path), url)
    run_publish(recipe, workdir)
    registry = Registry(recipe)
    record = json.loads(registry.read(f"v0001/{RECORD}"))
    planted = tmp_path / "planted-model"
    shutil.copytree(recipe.base_model.path, planted)
    for base_model, base_version in [
        (registry.url_of("v0001"), "../../escaped"),  # would copy v0001 to tmp_path/escaped
        (registry.url_of("v0001"), "v0009"),  # no such version
        (str(planted), None),  # any folder on the machine
        (str(planted), "v0001"),  # a real version under another URL
    ]:
        record.update(base_model=base_model, base_version=base_version)
        with registry.fs.open(registry.path(f"v0001/{RECORD}"), "wb") as out:
            out.write(json.dumps(record).encode())
        continued, why = continue_from(recipe, tmp_path / "next-run")
        assert continued.base_model.path == recipe.base_model.path, (base_model, base_version)
        assert "not trusted" in why and repr(base_version) in why
    assert not (tmp_path / "escaped").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["planted-model", "wd"] + ["registry"] * (kind == "path")
    )


def test_a_base_mapping_auto_classes_to_its_own_code_is_published_without_the_map(tmp_path, tiny_model_dir):
    """Security: a llama base whose config.json and tokenizer_config.json carry an auto_map
    trains on the built-in class (trust_remote_code is off); the published version holds no
    auto_map naming code it does not contain, so trust_remote_code=True runs nothing planted."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "modeling_planted.py").write_text("raise SystemExit('planted code ran')\n")
    planted = {"AutoConfig": "configuration_planted.C", "AutoModelForCausalLM": "modeling_planted.M"}
    for name, auto_map in [
        ("config.json", planted),
        ("tokenizer_config.json", {"AutoTokenizer": ["tok_planted.T", None]}),
    ]:
        settings = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**settings, "auto_map": auto_map}))
    path, workdir = _audit(tmp_path / "run", base)
    recipe = with_registry(load_recipe(path), str(tmp_path / "registry"))
    report = run_publish(recipe, workdir)
    version = Path(recipe.publish.registry) / "tiny" / report["version"]
    assert "auto_map" not in json.loads((version / "config.json").read_text())
    assert "auto_map" not in json.loads((version / "tokenizer_config.json").read_text())
    assert not list(version.glob("*planted*"))


def test_an_export_naming_code_it_does_not_hold_is_never_published(audited):
    """A workdir trained by an earlier Refit, whose export kept the base's auto_map: refused."""
    recipe, workdir = audited
    config_file = workdir / "train" / "final" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "auto_map": {"AutoConfig": "x.C"}}))
    marker = json.loads((workdir / "train" / MARKER).read_text())  # as that Refit recorded it
    marker["outputs"]["final/config.json"] = sha256(config_file.read_bytes())
    marker["sizes"]["final/config.json"] = config_file.stat().st_size
    (workdir / "train" / MARKER).write_text(json.dumps(marker))
    with pytest.raises(PublishRefused, match=r"config.json: AutoConfig: x\.C"):
        run_publish(recipe, workdir)
    assert not (Path(recipe.publish.registry) / "tiny").exists()
