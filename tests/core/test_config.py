"""The recipe schema: defaults from the paper, and every rejection named by field and line."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import textwrap
from pathlib import Path

import fsspec
import pytest
from conftest import BASE_RECIPE, REPO, write_recipe
from pydantic import ValidationError

from refit.flows.cli import main as refit
from refit.stages.core.config import (
    MAX_NAME_LENGTH,
    PRETRAINING_RECORD,
    Recipe,
    RecipeError,
    load_recipe,
)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A recipe folder with a base checkpoint stub, two corpora and a benchmark."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    for name in ("old.jsonl", "new.jsonl", "qa.jsonl"):
        (tmp_path / "data" / name).write_text('{"id": "1", "text": "x"}\n')
    (tmp_path / "data" / "bench.jsonl").write_text('{"id": "1", "query": "q", "choices": [" a", " b"], "gold": 0}\n')
    return tmp_path


def problems(folder: Path, recipe: dict | str) -> dict[str, tuple[int | None, str]]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(folder, recipe))
    return {path: (line, message) for path, line, message in caught.value.problems}


def edit(**changes) -> dict:
    recipe = json.loads(json.dumps(BASE_RECIPE))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = recipe
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[leaf] = value
    return recipe


def test_defaults_follow_the_paper(layout):
    recipe = load_recipe(write_recipe(layout, BASE_RECIPE))
    assert recipe.schedule.max_lr == 3e-4  # the base model's pretraining minimum LR
    assert recipe.schedule.warmup_fraction == 0 and recipe.schedule.decay == "cosine"
    assert recipe.schedule.min_lr_ratio == 0.01
    assert recipe.schedule.total_tokens == 2_000_000
    general, qa = recipe.phases
    assert general.lr_below is None and qa.lr_below == 0.2
    assert qa.normalised()["qa"] == pytest.approx(0.10)
    assert general.normalised() == pytest.approx({"old": 0.6, "new": 0.4})
    assert recipe.workdir == str(layout / "runs" / "r1")
    assert recipe.sources[0].paths == [str(layout / "data" / "old.jsonl")]  # relative to the recipe
    assert recipe.curate.minhash.buckets == 14 and recipe.curate.minhash.hashes_per_bucket == 8


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", (annotation,)):
                if isinstance(candidate, type) and issubclass(candidate, Recipe.__mro__[1]):
                    walk(candidate)

    walk(Recipe)


def test_recipe_is_frozen(layout):
    recipe = load_recipe(write_recipe(layout, BASE_RECIPE))
    with pytest.raises(ValidationError):
        recipe.schedule.max_lr = 1.0


def test_max_lr_defaults_from_the_pretraining_record(layout):
    (layout / "base" / PRETRAINING_RECORD).write_text(
        json.dumps({"pretraining_min_lr": 1e-4, "pretraining_tokens": 5000})
    )
    recipe = load_recipe(write_recipe(layout, edit(base_model={"path": "base"})))
    assert recipe.schedule.max_lr == 1e-4 and recipe.base_model.pretraining_tokens == 5000


@pytest.mark.parametrize(
    "changes, path, message",
    [
        ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
        ({"train__warmup": 5}, "train.warmup", "Extra inputs are not permitted"),
        ({"sources__0__role": "old"}, "sources[0].role", "'legacy', 'new' or 'qa'"),
        ({"sources__1__name": "old"}, "sources[1].name", "source name 'old' is used twice"),
        ({"sources__0__paths": ["data/missing-*.jsonl"]}, "sources[0].paths[0]", "matches no file"),
        (
            {"base_model": {"path": "nowhere", "pretraining_min_lr": 3e-4}},
            "base_model.path",
            "no Hugging Face checkpoint",
        ),
        ({"base_model__pretraining_max_lr": 1e-4}, "base_model.pretraining_min_lr", "above pretraining_max_lr"),
        ({"base_model": {"path": "base"}}, "schedule.max_lr", "required"),
        (
            {"mixture": {"phases": [{"name": "a", "weights": {"old": 1, "web": 1}}]}},
            "mixture.phases[0].weights.web",
            "names no declared source (declared: old, new, qa)",
        ),
        (
            {"mixture": {"phases": [{"name": "a", "lr_below": 0.5, "weights": {"old": 1}}]}},
            "mixture.phases[0].lr_below",
            "the first phase starts at step 0",
        ),
        (
            {"mixture": {"phases": [{"name": "a", "weights": {"old": 1}}, {"name": "b", "weights": {"qa": 1}}]}},
            "mixture.phases[1].lr_below",
            "needs lr_below",
        ),
        (
            {
                "mixture": {
                    "phases": [
                        {"name": "a", "weights": {"old": 1}},
                        {"name": "b", "lr_below": 0.3, "weights": {"qa": 1}},
                        {"name": "c", "lr_below": 0.4, "weights": {"new": 1}},
                    ]
                }
            },
            "mixture.phases[2].lr_below",
            "0.4 does not decrease (previous threshold 0.3)",
        ),
        (
            {
                "mixture": {
                    "phases": [
                        {"name": "a", "weights": {"old": 1}},
                        {"name": "a", "lr_below": 0.3, "weights": {"qa": 1}},
                    ]
                }
            },
            "mixture.phases[1].name",
            "phase name 'a' is used twice",
        ),
        (
            {"mixture": {"phases": [{"name": "a", "weights": {"old": 0}}]}},
            "mixture.phases[0].weights",
            "must not all be zero",
        ),
        (
            {"mixture": {"phases": [{"name": "a", "weights": {"old": -1, "new": 2}}]}},
            "mixture.phases[0].weights",
            "non-negative",
        ),
        ({"schedule__decay": "constant"}, "mixture.phases[1].lr_below", "never falls"),
        ({"schedule__min_lr_ratio": 0.25}, "mixture.phases[1].lr_below", "not above schedule.min_lr_ratio 0.25"),
        ({"schedule__total_tokens": 1000}, "schedule.total_tokens", "make 0 optimizer steps"),
        (
            {"train__micro_batch_size": 5},
            "train.sequences_per_step",
            "not a multiple of micro_batch_size x num_processes = 5",
        ),
        ({"curate__min_chars": 500, "curate__max_chars": 100}, "curate.min_chars", "above max_chars"),
        ({"train__validation_tokens": 100}, "train.validation_tokens", "less than one row of tokenize.seq_len 512"),
        (
            {"evaluate": {"benchmarks": [{"name": "b", "path": "data/none.jsonl", "domain": "new"}]}},
            "evaluate.benchmarks[0].path",
            "no such file",
        ),
        (
            {
                "evaluate": {
                    "benchmarks": [
                        {"name": "b", "path": "data/bench.jsonl", "domain": "new"},
                        {"name": "b", "path": "data/bench.jsonl", "domain": "legacy"},
                    ]
                }
            },
            "evaluate.benchmarks[1].name",
            "benchmark name 'b' is used twice",
        ),
    ],
)
def test_rejections_name_the_field(layout, changes, path, message):
    found = problems(layout, edit(**changes))
    assert path in found, found
    assert message in found[path][1]


NAMED = pytest.mark.parametrize(
    "changes, path",
    [
        ({}, "name"),
        ({"publish": {}}, "publish.model_name"),
        ({}, "sources[0].name"),
        ({"evaluate": {"benchmarks": [{"path": "data/bench.jsonl", "domain": "new"}]}}, "evaluate.benchmarks[0].name"),
        ({"mixture": {"phases": [{"weights": {"old": 1}}]}}, "mixture.phases[0].name"),
    ],
    ids=["run", "model", "source", "benchmark", "phase"],
)


def named(changes: dict, path: str, name: str) -> dict:
    """The recipe of changes with name at path."""
    recipe = edit(**changes)
    node = recipe
    *parents, leaf = path.replace("[", ".").replace("]", "").split(".")
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[leaf] = name
    return recipe


@pytest.mark.parametrize("name", [".", "..", "a/b", "../x", ""])
@NAMED
def test_a_name_that_is_not_a_folder_of_its_own_is_rejected(layout, name, changes, path):
    found = problems(layout, named(changes, path, name))
    assert path in found, found
    expected = "cannot be a name" if name in (".", "..") else "should match pattern"
    assert expected in found[path][1]


@NAMED
def test_a_name_too_long_for_a_file_name_is_rejected(layout, changes, path):
    assert load_recipe(write_recipe(layout, named(changes, path, "a" * MAX_NAME_LENGTH)))
    found = problems(layout, named(changes, path, "a" * 300))  # the filesystem's limit is 255 bytes
    assert list(found) == [path], found
    assert "300 characters is too long: a name becomes a file or folder name" in found[path][1]


@pytest.mark.parametrize(
    "name",
    [
        *("quarantine", "removed", "work", "minhash-index", "exact-index", "id-index"),  # curate's folders
        *("state.sqlite", "state.sqlite-journal", "report.json", "report.json.tmp", "_SUCCESS.json"),  # its files
        "logs",  # tokenize's datatrove logs, removed after its run
        *("Report.JSON", "STATE.sqlite"),  # the same file on a filesystem that ignores case
    ],
)
def test_a_source_cannot_take_a_name_a_stage_writes_beside_the_per_source_folders(layout, name):
    found = problems(layout, named({}, "sources[0].name", name))
    assert list(found) == ["sources[0].name"], found
    assert f"{name!r} is taken:" in found["sources[0].name"][1]
    assert "beside the per-source folders" in found["sources[0].name"][1]


def test_all_problems_are_listed_at_once_with_yaml_lines(layout):
    text = textwrap.dedent("""\
        name: r1
        base_model:
          path: nowhere
          pretraining_min_lr: 3.0e-4
        sources:
          - name: old
            paths: [data/old.jsonl]
            role: legacy
          - name: new
            paths: [data/missing.jsonl]
            role: new
            colour: blue
        mixture:
          phases:
            - name: a
              weights: {old: 1, web: 1}
            - name: b
              lr_below: 0.3
              weights: {new: -1}
            - name: c
              lr_below: 0.5
              weights: {old: 1}
        schedule:
          total_tokens: 2M
        """)
    found = problems(layout, text)
    assert found == {
        "base_model.path": (3, found["base_model.path"][1]),
        "sources[1].paths[0]": (10, found["sources[1].paths[0]"][1]),
        "sources[1].colour": (12, "Extra inputs are not permitted"),
        "mixture.phases[0].weights.web": (16, found["mixture.phases[0].weights.web"][1]),
        "mixture.phases[1].weights": (19, found["mixture.phases[1].weights"][1]),
        "mixture.phases[2].lr_below": (21, "0.5 does not decrease (previous threshold 0.3)"),
    }


def test_yaml_syntax_error_gives_its_line(layout):
    found = problems(layout, "name: r1\nsources: [\n  - a: b\n")
    ((line, message),) = found.values()
    assert line == 3 and "expected" in message


def test_cli_validate_exit_codes(layout, capsys):
    assert refit(["validate", str(write_recipe(layout, BASE_RECIPE))]) == 0
    out = capsys.readouterr().out
    assert "valid" in out  # BASE_RECIPE gives only pretraining_min_lr: how to give the others is explained
    assert "note: the base model's pretraining_max_lr, pretraining_tokens are unknown" in out
    assert "refit_pretraining.json" in out and "pretraining_tokens: 1T" in out
    bad = edit(colour="blue", sources__0__paths=["data/none.jsonl"])
    assert refit(["validate", str(write_recipe(layout, bad))]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "colour (line" in err and "sources[0].paths[0] (line" in err


def test_new_settings_are_checked_with_the_field_named(layout):
    weightless = edit(evaluate={"benchmarks": [{"name": "b", "path": "data/old.jsonl", "domain": "new", "weight": 0}]})
    assert problems(layout, weightless)["evaluate.benchmarks"][1].startswith("every weight is 0")
    wrong = edit(
        evaluate={"benchmarks": [{"name": "b", "path": "data/old.jsonl", "domain": "new", "metric": "f1"}]},
        curate={"decontaminate": "line"},
        sweep={"must_pass": ["lineage"]},
        sources__0__validation_paths=["held/*.jsonl"],
    )
    found = problems(layout, wrong)
    assert {"evaluate.benchmarks[0].metric", "curate.decontaminate", "sweep.must_pass[0]"} <= set(found)
    assert "matches no file" in found["sources[0].validation_paths[0]"][1]


def test_bundled_recipes_validate_without_the_base_model():
    recipe = load_recipe(REPO / "deployments" / "demo.yaml", check_files=False)
    assert [p.name for p in recipe.phases] == ["general", "qa"]
    assert len(recipe.evaluate.benchmarks) == 3


@pytest.mark.parametrize(
    "registry, message",
    [
        ("foo://models", "foo:// is not a filesystem fsspec knows"),
        ("s3://bucket/models", "the s3:// filesystem is not installed: Install s3fs"),
        ("simplecache::s3://bucket/models", "the s3:// filesystem is not installed: Install s3fs"),
        ("memory://models", "memory:// keeps the published versions in this process's memory, lost when it exits"),
    ],
)
def test_a_registry_that_cannot_hold_versions_is_rejected(layout, registry, message):
    if registry.endswith("s3://bucket/models") and importlib.util.find_spec("s3fs"):
        pytest.skip("s3fs is installed here")
    found = problems(layout, edit(publish={"registry": registry}))
    assert list(found) == ["publish.registry"], found
    assert message in found["publish.registry"][1]


@pytest.mark.parametrize("registry", ["file://registry", "file://./registry", "local://registry", None])
def test_a_relative_registry_is_relative_to_the_recipe(layout, tmp_path_factory, monkeypatch, registry):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    recipe = load_recipe(write_recipe(layout, edit(publish={"registry": registry} if registry else {})))
    fs, path = fsspec.core.url_to_fs(recipe.publish.registry)  # as publish opens it
    assert path == str(layout / "registry")
    assert recipe.publish.registry.startswith(registry.split("//")[0] if registry else "/")


# ----------------------------------------------------------------------------- the base checkpoint
# Checked by `refit validate` from the files' headers, before any trainer starts.

LLAMA = pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)


@pytest.fixture
def checkpoint(layout: Path, tiny_model_dir: Path) -> Path:
    """layout's base folder holding a real tiny checkpoint (one model.safetensors)."""
    shutil.rmtree(layout / "base")
    return Path(shutil.copytree(tiny_model_dir, layout / "base"))


@pytest.fixture
def sharded(checkpoint: Path) -> Path:
    """The checkpoint saved again by transformers in several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(checkpoint, max_shard_size="20KB")
    (checkpoint / "model.safetensors").unlink()
    assert len(shards(checkpoint)) > 2 and (checkpoint / "model.safetensors.index.json").is_file()
    return checkpoint


def shards(base: Path) -> list[Path]:
    return sorted(base.glob("model-*-of-*.safetensors"))


def base_problems(layout: Path) -> list[str]:
    """What validation says of the base checkpoint; it must say nothing of anything else."""
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(layout, BASE_RECIPE))
    assert {path for path, _, _ in caught.value.problems} == {"base_model.path"}, caught.value
    return [message for _, _, message in caught.value.problems]


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@LLAMA
def test_an_intact_checkpoint_passes(layout, checkpoint):
    assert load_recipe(write_recipe(layout, BASE_RECIPE))


@LLAMA
def test_an_intact_sharded_checkpoint_passes(layout, sharded):
    assert load_recipe(write_recipe(layout, BASE_RECIPE))


@LLAMA
def test_a_pickle_checkpoint_is_refused_with_how_to_convert_it(layout, checkpoint):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(checkpoint / "model.safetensors"), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    (message,) = base_problems(layout)
    assert message.startswith(f"{checkpoint} has no safetensors weights, only pytorch_model.bin: ")
    assert "Refit loads safetensors only (a pickle checkpoint can run code when loaded)" in message
    assert "save_pretrained(path, safe_serialization=True)" in message


@LLAMA
@pytest.mark.parametrize(
    "damage, why",
    [
        (
            lambda f: truncate(f, f.stat().st_size - 1),
            r"tensor '.+' has data_offsets \[\d+, \d+\], beyond",
        ),
        (lambda f: truncate(f, 100), r"its header length is \d+ bytes, and 92 bytes follow"),
        (lambda f: truncate(f, 3), r"3 bytes, too few for the 8-byte header length"),
        (lambda f: overwrite(f, 0, (2**40).to_bytes(8, "little")), rf"its header length is {2**40} bytes"),
        (lambda f: overwrite(f, 8, b"["), r"its header is not valid JSON \("),
        (lambda f: overwrite(f, 8, b"\xff"), r"its header is not valid JSON \("),
        (lambda f: overwrite(f, 8, b"[]".ljust(header_length(f))), r"its header is not a JSON object"),
    ],
    ids=["data-cut", "header-cut", "no-header", "huge-header", "bad-json", "not-utf8", "not-an-object"],
)
def test_a_truncated_or_corrupt_safetensors_file_is_named(layout, checkpoint, damage, why):
    weights = checkpoint / "model.safetensors"
    damage(weights)
    (message,) = base_problems(layout)
    assert re.fullmatch(f"{re.escape(str(weights))} is truncated or corrupt: {why}.*", message), message


@LLAMA
def test_a_sharded_checkpoint_with_shards_missing_or_cut_names_each(layout, sharded):
    first, second, *_ = shards(sharded)
    first.unlink()
    truncate(second, second.stat().st_size // 2)
    missing, cut = base_problems(layout)
    assert missing == f"{first} is missing: {sharded / 'model.safetensors.index.json'} lists it"
    assert cut.startswith(f"{second} is truncated or corrupt: tensor ")


@LLAMA
def test_a_shard_index_that_is_not_json_is_named(layout, sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-10])
    (message,) = base_problems(layout)
    assert message.startswith(f"{index} is not valid JSON (")


def test_config_json_that_is_not_json_is_one_problem_naming_it(layout):
    (layout / "base" / "config.json").write_text('{"model_type": "llama",')
    (message,) = base_problems(layout)
    assert message.startswith(f"{layout / 'base' / 'config.json'} is not valid JSON (")
