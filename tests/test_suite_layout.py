"""The test suite's own layout: helpers shared by test modules live in conftest.py, so that no
test module imports another (which would run, or skip, its tests' setup as a side effect)."""

from __future__ import annotations

import re

from conftest import REPO

CROSS_IMPORT = re.compile(r"\b(from\s+test_\w+\s+import|import\s+test_\w+)")


def test_no_test_module_imports_another():
    offenders = [
        f"tests/{path.name}:{number}: {line.strip()}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if CROSS_IMPORT.search(line)
    ]
    assert not offenders, "import shared helpers from conftest.py instead:\n" + "\n".join(offenders)
