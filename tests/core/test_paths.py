"""Names that become folders stay inside their folder: the recipe rejects `.` and `..`
(tests/core/test_config.py), and where a name is joined to a path the result is checked again, for
recipes made in code (model_copy skips validation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import NEW, make_recipe, write_jsonl

from refit.stages.core.config import load_recipe
from refit.stages.core.paths import PathEscape, inside
from refit.stages.curate.stage import curated_files, run_curate


@pytest.mark.parametrize("folder", [Path("/w/curate"), "/w/curate", "bucket/registry"])
def test_inside_keeps_names_below_their_folder(folder):
    assert inside(folder, "old", "train-0001.parquet") == type(folder)(f"{folder}/old/train-0001.parquet")
    assert inside(folder, "a..b") == type(folder)(f"{folder}/a..b")
    for escaping in ("..", ".", "", "../x", "a/../..", "/etc"):
        with pytest.raises(PathEscape, match="would leave"):
            inside(folder, escaping)


def test_curate_refuses_a_source_named_dot_dot(tmp_path):
    write_jsonl(tmp_path / "data" / "docs.jsonl", [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(NEW[:5])])
    recipe = load_recipe(make_recipe(tmp_path, [{"name": "docs", "paths": ["data/docs.jsonl"], "role": "new"}]))
    escaping = recipe.model_copy(update={"sources": [recipe.sources[0].model_copy(update={"name": ".."})]})
    with pytest.raises(PathEscape, match=r"'\.\./[\w.-]+' would leave"):
        run_curate(escaping, tmp_path / "wd")
    assert not list(tmp_path.rglob("*.parquet"))  # none in the workdir root, none anywhere
    with pytest.raises(PathEscape):
        curated_files(tmp_path / "wd", "..", "train")
