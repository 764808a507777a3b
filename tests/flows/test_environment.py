"""The lock: the environment `make test` runs in is the locked one, the lock covers pyproject's
ranges, and a package at another version is named, at `refit`'s start too."""

from __future__ import annotations

import tomllib

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from refit.flows import cli, environment
from refit.flows.environment import drift, drift_warning, locked_versions


def test_the_environment_running_the_tests_is_the_locked_one():
    assert environment.LOCK == REPO / "requirements.lock"
    assert drift() == []


def test_every_dependency_in_pyproject_is_locked_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = locked_versions(environment.LOCK)
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml but not in requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert pins["torch"] == "2.13.0+cpu"  # the CPU build, never the CUDA one


def test_a_package_at_another_version_or_missing_is_named(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "torch==0.0.1\n    # via refit (pyproject.toml)\n"
        "PyYAML==6.0.0.0.1\n"  # names compare canonicalised
        "no-such-package-anywhere==1.0\n"
        'colorama==0.0.1 ; sys_platform == "win32"\n'  # a marker that does not hold here: not compared
        "--extra-index-url https://example.invalid/simple\n"
    )
    assert drift(lock) == [
        "no-such-package-anywhere: locked 1.0, not installed",
        f"pyyaml: locked 6.0.0.0.1, installed {__import__('yaml').__version__}",
        f"torch: locked 0.0.1, installed {__import__('torch').__version__}",
    ]


def test_refit_warns_at_start_naming_the_drifted_package(tmp_path, monkeypatch, capsys):
    lock = tmp_path / "requirements.lock"
    lock.write_text("pyyaml==0.1\n")
    monkeypatch.setattr(environment, "LOCK", lock)
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[0] == drift_warning(lock)
    assert "pyyaml: locked 0.1, installed" in stderr and "make install" in stderr


def test_no_lock_beside_the_package_means_nothing_to_compare(tmp_path):
    assert drift(tmp_path / "requirements.lock") == [] and drift_warning(tmp_path / "requirements.lock") is None
