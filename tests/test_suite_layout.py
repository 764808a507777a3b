"""The test suite's own layout: the tree mirrors the package (tests/<stage>/ for each stage
under stages/, tests/core/ for stages/core/, tests/flows/ for flows/; repository-wide checks at
the top), and helpers shared by test modules live in conftest.py, so that no test module
imports another (which would run, or skip, its tests' setup as a side effect)."""

from __future__ import annotations

import re

from conftest import REPO

CROSS_IMPORT = re.compile(r"\b(from\s+test_\w+\s+import|import\s+test_\w+)")
TESTS = REPO / "tests"


def test_no_test_module_imports_another():
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if CROSS_IMPORT.search(line)
    ]
    assert not offenders, "import shared helpers from conftest.py instead:\n" + "\n".join(offenders)


def test_the_test_tree_mirrors_the_package():
    packages = {p.name for p in (REPO / "stages").iterdir() if (p / "__init__.py").is_file()} | {"flows"}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= packages, f"test folders that name no package folder: {sorted(folders - packages)}"
    stages = packages - {"core", "flows"}
    assert stages <= folders, f"stages without a test folder: {sorted(stages - folders)}"
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test modules share a name (pytest imports them by name)"
