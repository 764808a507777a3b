"""A full disk in any stage that writes: one line naming the stage and the place, exit code 1,
and the stage's previous output (or the registry's versions) unchanged. Each stage is run
forced on a copy of a finished workdir on a small tmpfs with no space left, then with half
the space its output needs (and a page for the workdir's lock) (curate's own case is in tests/curate/test_curate.py)."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import LENIENT, prepare, small_filesystem

from refit.flows.cli import main as refit
from refit.stages.audit.stage import run_audit
from refit.stages.core.config import load_recipe
from refit.stages.evaluate.stage import run_evaluate
from refit.stages.publish.stage import run_publish
from refit.stages.train.stage import run_train

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)]


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _contents(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fill(filler, leave: int) -> None:
    """Write filler until the disk is full, then give `leave` bytes back."""
    with open(filler, "wb", buffering=0) as out:
        try:
            while out.write(b"\0" * (64 << 10)):
                pass
        except OSError:
            pass
        out.truncate(max(out.tell() - leave, 0))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A workdir every stage has run in, and the registry it published to."""
    path, workdir = prepare(tmp_path_factory.mktemp("finished"), tiny_model_dir, validation_fraction=0.3, gates=LENIENT)
    recipe = load_recipe(path)
    for stage in (run_train, run_evaluate, run_audit, run_publish):
        stage(recipe, workdir)
    return path, workdir


@pytest.mark.parametrize("space", ["none", "half"])
@pytest.mark.parametrize("stage", ["tokenize", "mix", "train", "evaluate", "audit", "publish"])
def test_a_full_disk_ends_the_stage_in_one_line_and_loses_nothing(finished, stage, space, tmp_path, capsys):
    path, finished_workdir = finished
    registry = path.parent / "registry"
    written = _size(registry if stage == "publish" else finished_workdir / stage)
    needed = _size(finished_workdir) + _size(registry)
    with small_filesystem(tmp_path / "disk", needed + (4 << 20)) as disk:
        workdir = shutil.copytree(finished_workdir, disk / "wd")
        recipe = yaml.safe_load(path.read_text())
        recipe["publish"]["registry"] = str(shutil.copytree(registry, disk / "registry"))
        recipe_path = path.with_name(f"on-small-disk-{stage}-{space}.yaml")  # beside the data it names
        recipe_path.write_text(yaml.safe_dump(recipe))
        before = _contents(disk)
        _fill(disk / "filler", leave=4096 + written // 2 if space == "half" else 0)  # a page for the lock
        capsys.readouterr()
        assert refit(["stage", stage, str(recipe_path), "--workdir", str(workdir), "--force"]) == 1
        err = capsys.readouterr().err
        # the training processes' own log is passed through as it is (DCP logs its failure with a traceback)
        assert stage == "train" or "Traceback" not in err, err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "no space left on device writing" in line and f"{disk}/" in line, line  # what and where
        assert space == "none" or line.startswith(f"error: {stage}: "), line  # with none, the lock is first
        (disk / "filler").unlink()
        # a resumable stage (tokenize, train) keeps its staging folder beside for the rerun, and the
        # workdir's lock file stays (empty: no holder); nothing else may have changed
        kept = [name for name in _contents(disk) if name.parts[1].endswith(".tmp") or name.name == ".refit.lock"]
        assert {name: data for name, data in _contents(disk).items() if name not in kept} == before
