"""publish: complete versions or none, never twice, refused without a passing audit of this
very checkpoint; the model card reads back with huggingface_hub."""

from __future__ import annotations

import hashlib
import json

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from test_train import prepare

from refit.stages.audit import AuditFailed, run_audit
from refit.stages.evaluate import run_evaluate
from refit.stages.lib.config import load_recipe
from refit.stages.publish import PublishRefused, run_publish
from refit.stages.train import run_train

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)]
# one benchmark item cannot show an accuracy gain beyond noise: these tests are about publishing
LENIENT = {"min_average_gain": -1.0}


@pytest.fixture
def audited(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, validation_fraction=0.3, gates=LENIENT)
    recipe = load_recipe(path)
    for stage in (run_train, run_evaluate, run_audit):
        stage(recipe, workdir)
    return recipe, workdir, tmp_path / "registry" / "tiny"


def test_publishes_a_complete_version_once(audited):
    recipe, workdir, root = audited
    first = run_publish(recipe, workdir)
    assert first["version"] == "v0001" and not first["already_published"]
    version = root / "v0001"
    sums = dict(reversed(line.split("  ", 1)) for line in (version / "SHA256SUMS").read_text().splitlines())
    files = {str(p.relative_to(version)) for p in version.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == files
    assert all(hashlib.sha256((version / name).read_bytes()).hexdigest() == digest for name, digest in sums.items())
    assert {
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "manifest.json",
        "refit_recipe.yaml",
        "audit/report.md",
        "audit/report.json",
        "audit/training.png",
    } <= files
    assert (root / "latest").read_text().strip() == "v0001"
    again = run_publish(recipe, workdir)
    assert again["version"] == "v0001" and again["already_published"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "v0001"]


def test_model_card_reads_back_with_huggingface_hub(audited):
    recipe, workdir, root = audited
    run_publish(recipe, workdir)
    card = ModelCard.load(root / "v0001" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == recipe.base_model.path
    assert card.data.datasets == ["old", "new"]
    results = {r.metric_type: r for r in card.data.eval_results}
    evaluation = json.loads((workdir / "eval" / "report.json").read_text())
    for metric in ("acc", "acc_norm"):
        assert results[metric].dataset_name == "b"
        assert results[metric].metric_value == round(100 * evaluation["benchmarks"]["b"][metric]["candidate"], 2)
    assert "## Audit gates" in card.text and "## Intended use" in card.text and "## Cost" in card.text


def test_killed_publish_leaves_no_partial_version_and_rerun_completes(audited, monkeypatch):
    recipe, workdir, root = audited
    import fsspec.implementations.local as local

    real, written = local.LocalFileSystem.pipe_file, []

    def crash_after_three(self, path, value, *args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")  # the process dies here: nothing after this runs
        written.append(path)
        return real(self, path, value, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "pipe_file", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_publish(recipe, workdir)
    monkeypatch.setattr(local.LocalFileSystem, "pipe_file", real)
    assert [p.name for p in root.iterdir()] == ["v0001.partial"]  # invisible: not a version, no latest
    assert run_publish(recipe, workdir)["version"] == "v0001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "v0001"]


def test_refuses_a_failed_audit_and_a_changed_checkpoint(audited):
    recipe, workdir, root = audited
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
    assert not root.exists()
