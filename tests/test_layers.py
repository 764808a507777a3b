"""The layers hold: `make lint` runs import-linter with the contracts in pyproject.toml, which
must say what the stages declare (each stage imports core and the stages it reads, core no
stage, stages nothing of flows, no cycles), and a back-import planted in a copy breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO

from refit.stages.pipeline import NAMES, PIPELINE

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contracts() -> dict[str, dict]:
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["name"]: contract for contract in settings["contracts"]}


def test_each_stage_may_import_exactly_the_stages_it_declares_it_reads():
    contracts = _contracts()
    stages = [f"refit.stages.{name}" for name in NAMES]
    for stage in PIPELINE:
        contract = contracts[f"{stage.name} imports only the stages it reads"]
        allowed = {f"refit.stages.{name}" for name in (stage.name, *(read.name for read in stage.reads))}
        assert contract["source_modules"] == [f"refit.stages.{stage.name}"]
        assert set(contract["forbidden_modules"]) == (set(stages) - allowed) | {"refit.stages.pipeline"}, stage.name
    core = contracts["core imports no stage"]
    assert set(core["forbidden_modules"]) == {*stages, "refit.stages.pipeline"}
    assert contracts["stages import nothing of flows"]["forbidden_modules"] == ["refit.flows"]
    assert contracts["no import cycles between sibling modules or packages"]["type"] == "acyclic_siblings"


def _lint_copy(tmp_path: Path, plant: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the project (the real sources are never touched), with one
    import line planted in one module."""
    root = tmp_path / "refit"
    for folder in ("stages", "flows"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    if plant:
        module, line = plant
        path = root / module
        path.write_text(
            path.read_text().replace(
                "from __future__ import annotations\n", f"from __future__ import annotations\n\n{line}\n", 1
            )
        )
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )


def test_the_contracts_hold_and_a_planted_back_import_breaks_them(tmp_path):
    kept = _lint_copy(tmp_path / "as-is")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    broken = _lint_copy(
        tmp_path / "planted", ("stages/curate/stage.py", "from refit.stages.audit import stage as audit")
    )
    assert broken.returncode != 0
    assert "curate imports only the stages it reads BROKEN" in broken.stdout, broken.stdout
    looped = _lint_copy(tmp_path / "cycle", ("stages/core/markers.py", "from refit.stages.core import contract"))
    assert "no import cycles between sibling modules or packages BROKEN" in looped.stdout, looped.stdout
