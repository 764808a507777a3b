"""`refit init`: every template writes a complete, commented recipe that validates, with or
without QA data and a pretraining record; quick-pilot runs tiny data through every stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import DATASETS, LEGACY, NEW, rows, write_jsonl

from refit.flows.cli import main
from refit.flows.templates import TEMPLATES, render
from refit.stages.core.config import PRETRAINING_RECORD, load_recipe
from refit.stages.pipeline import STAGES

pytestmark = pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)


def _data(tmp_path: Path) -> dict[str, str]:
    write_jsonl(
        tmp_path / "data" / "legacy" / "a.jsonl", [{"id": f"o{i}", "text": d["text"]} for i, d in enumerate(LEGACY)]
    )
    write_jsonl(tmp_path / "data" / "new" / "a.jsonl", [{"id": f"n{i}", "text": d["text"]} for i, d in enumerate(NEW)])
    qa = list(rows(DATASETS / "qa_docs.jsonl.gz"))[:40]
    write_jsonl(tmp_path / "data" / "qa.jsonl", [{"id": f"q{i}", "text": d["text"]} for i, d in enumerate(qa)])
    data = tmp_path / "data"
    return {
        "legacy": str(data / "legacy" / "*.jsonl"),
        "new": str(data / "new" / "*.jsonl"),
        "qa": str(data / "qa.jsonl"),
    }


def _init(out: Path, template: str, base: Path, paths: dict[str, str], *extra: str) -> int:
    argv = ["init", "--template", template, str(out), "--base", str(base)]
    for key, value in paths.items():
        argv += [f"--{key}", value]
    return main([*argv, *extra])


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_writes_a_commented_recipe_that_validates(template, tmp_path, tiny_model_dir, capsys):
    paths = _data(tmp_path)
    out = tmp_path / "recipes" / f"{template}.yaml"
    assert _init(out, template, tiny_model_dir, paths, "--max-lr", "1e-3") == 0
    assert main(["validate", str(out)]) == 0
    recipe = load_recipe(out)
    assert recipe.name == template and recipe.schedule.max_lr == 1e-3
    assert [s.role for s in recipe.sources] == ["legacy", "new", "qa"] and len(recipe.phases) == 2
    for line in out.read_text().splitlines():  # every knob says what it does
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert " # " in line or line.lstrip().startswith(("- name:", "name:", "weights", "role")), line
    text = out.read_text()
    assert "(paper: max_lr/100)" in text and "(paper: no warmup)" in text
    assert _init(out, template, tiny_model_dir, paths) == 2  # never overwrites silently

    # without QA data: one phase, nothing to switch to or search; max_lr from the pretraining record
    base = tmp_path / "base-with-record"
    shutil.copytree(tiny_model_dir, base)
    (base / PRETRAINING_RECORD).write_text(json.dumps({"pretraining_min_lr": 2e-4, "pretraining_max_lr": 2e-3}))
    no_qa = {k: v for k, v in paths.items() if k != "qa"}
    assert _init(tmp_path / "no-qa.yaml", template, base, no_qa) == 0
    recipe = load_recipe(tmp_path / "no-qa.yaml")
    assert recipe.schedule.max_lr == 2e-4 and len(recipe.phases) == 1 and recipe.sweep.search.lr_below is None
    capsys.readouterr()


def test_the_templates_differ_where_they_say(tmp_path, tiny_model_dir):
    paths = _data(tmp_path)
    recipes = {}
    for template in TEMPLATES:
        _init(tmp_path / f"{template}.yaml", template, tiny_model_dir, paths, "--max-lr", "1e-3")
        recipes[template] = load_recipe(tmp_path / f"{template}.yaml")
    paper, wsd, adapt, pilot = (recipes[t] for t in ("paper", "wsd", "domain-adapt", "quick-pilot"))
    assert paper.schedule.decay == "cosine" and paper.phases[1].lr_below == 0.2 and paper.phases[1].weights["qa"] == 0.1
    assert wsd.schedule.decay == "wsd" and wsd.phases[1].lr_below == 0.99  # the first decaying steps
    assert adapt.phases[0].normalised()["new"] > paper.phases[0].normalised()["new"]
    assert adapt.gates.max_legacy_loss_increase < paper.gates.max_legacy_loss_increase
    assert pilot.schedule.total_tokens < paper.schedule.total_tokens


def test_init_refuses_paths_that_match_nothing(tmp_path, tiny_model_dir, capsys):
    paths = {**_data(tmp_path), "new": str(tmp_path / "nowhere" / "*.jsonl")}
    assert _init(tmp_path / "r.yaml", "paper", tiny_model_dir, paths, "--max-lr", "1e-3") == 2
    assert "sources[1].paths[0]" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_pilot_runs_tiny_data_through_every_stage(tmp_path, tiny_model_dir):
    paths = _data(tmp_path)
    out = tmp_path / "pilot.yaml"
    assert _init(out, "quick-pilot", tiny_model_dir, paths, "--max-lr", "3e-3") == 0
    spec = yaml.safe_load(out.read_text())  # the tiny model's sizes and budget; the rest is the template's
    spec["schedule"]["total_tokens"] = 12 * 4 * 32
    spec["tokenize"] = {"seq_len": 32, "workers": 1}
    spec["curate"]["workers"] = 1
    spec["train"].update(micro_batch_size=2, sequences_per_step=4, checkpoint_every=6, validation_tokens=256)
    bench = DATASETS / "benchmarks" / "sql_cloze.jsonl"
    spec["evaluate"] = {
        "benchmarks": [{"name": "sql_cloze", "path": str(bench), "domain": "new"}],
        "validation_docs": 20,
    }
    spec["gates"].update(min_average_gain=-1.0, max_benchmark_drop=1.0, max_legacy_loss_increase=10.0)
    spec["gates"]["require_new_loss_decrease"] = False
    spec["publish"] = {"registry": str(tmp_path / "registry")}
    out.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(out)
    workdir = tmp_path / "wd"
    reports = {name: stage.run(recipe, workdir) for name, stage in STAGES.items()}
    assert reports["train"]["steps"] == 12 and [s["phase"] for s in reports["train"]["switches"]] == ["qa"]
    assert reports["audit"]["passed"] and (tmp_path / "registry" / "pilot" / "latest").exists()


def test_every_value_is_written_so_that_it_reads_back_as_given(tmp_path, tiny_model_dir):
    tricky = 'a\nworkdir: /elsewhere # "quoted" \\ it\'s: [x] {y} \u2028 \U0001f600'
    text = render(
        "paper", tricky, base=f"{tiny_model_dir}/{tricky}", legacy=tricky, new="yes", qa="2024", total_tokens=tricky
    )
    spec = yaml.safe_load(text)
    assert spec["name"] == tricky and "workdir" not in spec
    assert spec["base_model"]["path"] == f"{tiny_model_dir}/{tricky}"
    assert [s["paths"] for s in spec["sources"]] == [[tricky], ["yes"], ["2024"]]
    assert spec["schedule"]["total_tokens"] == tricky


def _names_of(out: Path, tiny_model_dir: Path, paths: dict[str, str], *extra: str) -> tuple[int, str | None]:
    """(exit code of `refit init` into out, the name the written recipe has, None if none was written)."""
    code = _init(out, "paper", tiny_model_dir, paths, "--max-lr", "1e-3", *extra)
    return code, load_recipe(out).name if out.exists() else None


@pytest.mark.parametrize("stem", ["2024", "yes", "null", "1e3", "my recipe"])
def test_the_name_taken_from_the_file_name_stays_a_string(tmp_path, tiny_model_dir, stem, capsys):
    code, name = _names_of(tmp_path / f"{stem}.yaml", tiny_model_dir, _data(tmp_path))
    assert (code, name) == (0, stem.replace(" ", "-")), capsys.readouterr().err


@pytest.mark.parametrize("file_name", ["..yaml", "...yaml", "a" * 240 + ".yaml"])
def test_a_file_name_that_makes_no_name_asks_for_one(tmp_path, tiny_model_dir, file_name, capsys):
    paths = _data(tmp_path)
    assert _names_of(tmp_path / "recipes" / file_name, tiny_model_dir, paths) == (2, None)
    assert "give one with --name" in capsys.readouterr().err
    assert not (tmp_path / "recipes").exists()
    assert _names_of(tmp_path / "recipes" / file_name, tiny_model_dir, paths, "--name", "ok") == (0, "ok")


def test_a_name_with_a_newline_injects_no_key_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "r.yaml"
    assert _names_of(out, tiny_model_dir, _data(tmp_path), "--name", "evil\nworkdir: /tmp/elsewhere") == (2, None)
    err = capsys.readouterr().err
    assert "name (line 3): String should match pattern" in err and "1 problem" in err


def test_an_invalid_recipe_leaves_nothing_behind_and_no_good_file_replaced(tmp_path, tiny_model_dir, capsys):
    paths = _data(tmp_path)
    broken = {**paths, "new": str(tmp_path / "nowhere" / "*.jsonl")}
    folder = tmp_path / "recipes"
    assert _names_of(folder / "r.yaml", tiny_model_dir, broken) == (2, None)
    assert not folder.exists() or not any(folder.iterdir())  # not even a temporary file
    assert f"recipe {folder / 'r.yaml'} has 1 problem" in capsys.readouterr().err

    assert _names_of(folder / "r.yaml", tiny_model_dir, paths) == (0, "r")
    good = (folder / "r.yaml").read_text()
    assert _names_of(folder / "r.yaml", tiny_model_dir, broken, "--overwrite") == (2, "r")
    assert (folder / "r.yaml").read_text() == good and [p.name for p in folder.iterdir()] == ["r.yaml"]
    assert _names_of(folder / "r.yaml", tiny_model_dir, paths, "--overwrite", "--name", "s") == (0, "s")
