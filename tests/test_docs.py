"""The documentation: the recipe reference is generated from the code and current, the README
stays a README, every relative link resolves, and nothing points outside the repository."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

from refit.flows.recipe_reference import render

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_recipe_reference_is_the_one_generated_from_the_field_docstrings():
    assert (REPO / "docs" / "recipe.md").read_text() == render(), "docs/recipe.md is stale: run `make docs`"


def test_the_readme_fits_on_a_few_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = REPO / name
        if path.is_file() and path.suffix not in {".gz", ".png", ".arrow", ".parquet", ".safetensors"}:
            try:
                yield path, path.read_text()
            except UnicodeDecodeError:
                continue


def test_every_relative_link_in_the_docs_resolves():
    for path, text in _tracked_text_files():
        if path.suffix == ".md":
            for target in LINK.findall(text):
                if "://" not in target and not target.startswith("mailto:"):
                    assert (path.parent / target).exists(), f"{path.relative_to(REPO)} links to missing {target}"


def test_nothing_in_the_repository_points_outside_it():
    for path, text in _tracked_text_files():
        if path.name != "test_docs.py":
            assert "../shared" not in text and "DESIGN.md" not in text, path.relative_to(REPO)
