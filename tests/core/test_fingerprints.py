"""A stage's fingerprint follows what it declares it reads: every recipe field is read by a
stage, marked or left to the flows; no stage reads a field it does not declare; and its code
version follows the meaning of the code it runs, so rewording a docstring reruns nothing and a
change to one section's class reruns only the stages that read that section."""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NEW, REPO, make_recipe, write_jsonl

from refit.stages.core.code_version import covers
from refit.stages.core.config import (
    Recipe,
    Section,
    execution_only,
    fields_along,
    load_recipe,
    sections_in,
    unfingerprinted,
)
from refit.stages.core.markers import is_done, write_marker
from refit.stages.pipeline import NAMES, PIPELINE, STAGES

# ----------------------------------------------------------------------------- every field classified


def unclassified(recipe: type[Section], declared: set[str], prefix: str = "") -> list[str]:
    """The recipe's fields (at any depth) that no stage declares it reads and no mark classifies."""
    found = []
    for name, field in recipe.model_fields.items():
        path = prefix + name
        if unfingerprinted(field) or covers(declared, path):
            continue
        sections = sections_in(field.annotation)
        found += unclassified(sections[0], declared, path + ".") if sections else [path]
    return found


def test_every_recipe_field_is_read_by_a_stage_marked_or_read_by_the_flows_only():
    declared = {path for stage in PIPELINE for path in stage.recipe_reads}
    assert unclassified(Recipe, declared) == []
    assert unfingerprinted(Recipe.model_fields["sweep"]) == "read by the flows only"

    class Knobs(Section):
        knob: int = 0
        processes: int = execution_only(1)

    class Grown(Recipe):  # a new section no stage reads: its unmarked field must be classified
        knobs: Knobs = Knobs()

    assert unclassified(Grown, declared) == ["knobs.knob"]


# ----------------------------------------------------------------------------- no undeclared read


def _chains(code: ast.AST, root: str) -> Iterator[tuple[int, list[str]]]:
    """The attribute chains read from `root` (a name, or an attribute: `run.recipe`), longest
    only, as (line, names after the root)."""
    inner = {id(node.value) for node in ast.walk(code) if isinstance(node, ast.Attribute)}
    for node in ast.walk(code):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            names, base = [], node
            while isinstance(base, ast.Attribute):
                names.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == root:
                yield node.lineno, names
            elif root in names[:-1]:
                yield node.lineno, names[names.index(root) + 1 :]


@functools.cache
def _property_reads(name: str) -> tuple[str, ...]:
    """What a property of the recipe reads of it (`peak_lr`: schedule.max_lr)."""
    source = textwrap.dedent(inspect.getsource(getattr(Recipe, name).fget))
    return tuple(".".join(names) for _, names in _chains(ast.parse(source), "self"))


def _paths(names: list[str]) -> tuple[list[str], bool]:
    """The recipe paths a chain read from a recipe reads, and whether it goes on past them (a
    method of the value read, such as model_dump: the whole of it is read)."""
    if isinstance(getattr(Recipe, names[0], None), property):
        return list(_property_reads(names[0])), False
    path, section = [], Recipe
    for name in names:
        if section is None or name not in section.model_fields:
            break
        path.append(name)
        section = next(iter(sections_in(section.model_fields[name].annotation)), None)
    return ([".".join(path)] if path else []), len(path) < len(names)


class _Module:
    """A project module's syntax tree, its top-level functions and what its names import."""

    def __init__(self, name: str, source: str):
        self.name, self.tree = name, ast.parse(source)
        self.functions = {node.name: node for node in self.tree.body if isinstance(node, ast.FunctionDef)}
        self.imports = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                self.imports |= {alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                self.imports |= {alias.asname or alias.name: alias.name for alias in node.names}

    def callees(self, code: ast.AST) -> Iterator[tuple[str, str]]:
        """(module, function) of every call in code to a function of this module or one it imports."""
        for node in ast.walk(code):
            function = node.func if isinstance(node, ast.Call) else None
            if isinstance(function, ast.Name) and function.id in self.functions:
                yield self.name, function.id
            elif isinstance(function, ast.Name) and function.id in self.imports:
                yield tuple(self.imports[function.id].rpartition(".")[::2])
            elif isinstance(function, ast.Attribute) and getattr(function.value, "id", None) in self.imports:
                yield self.imports[function.value.id], function.attr


@functools.cache
def _project_module(name: str) -> _Module | None:
    try:
        spec = importlib.util.find_spec(name) if name.startswith("refit.") else None
    except ModuleNotFoundError:
        return None
    return _Module(name, Path(spec.origin).read_text()) if spec and spec.origin else None


def package_sources(stage: str) -> dict[str, str]:
    folder = Path(importlib.util.find_spec(f"refit.stages.{stage}").origin).parent
    return {f"refit.stages.{stage}.{path.stem}": path.read_text() for path in sorted(folder.glob("*.py"))}


def undeclared_reads(stage: str, sources: dict[str, str]) -> dict[str, list[str]]:
    """What the code of `stage` (sources: module name -> text) reads of the recipe that the stage
    does not declare: path -> where. Its own modules are read whole, and so are the functions of
    other project modules they call, at any depth (a core helper such as `schedule_for` reads for
    its caller); a recipe is known by its name, `recipe`. A section or list passed along whole, or
    looped over, counts as declared when the stage declares part of it: what is read of it further
    on is out of this check's sight."""
    declared = set(STAGES[stage].recipe_reads)
    todo = [(module, module.tree) for module in (_Module(name, text) for name, text in sources.items())]
    followed, found = set(), {}
    while todo:
        module, code = todo.pop()
        for line, names in _chains(code, "recipe"):
            paths, beyond = _paths(names)
            for path in paths:
                partly = any(entry.startswith(path + ".") for entry in declared) and not beyond
                container = bool(sections_in(fields_along(path)[-1].annotation))
                if not (covers(declared, path) or (container and partly)):
                    found.setdefault(path, []).append(f"{module.name}:{line}")
        for callee in set(module.callees(code)) - followed:
            followed.add(callee)
            owner = _project_module(callee[0])
            outside = not callee[0].startswith(f"refit.stages.{stage}.")  # its own modules are read whole
            if outside and owner and callee[1] in owner.functions:
                todo.append((owner, owner.functions[callee[1]]))
    return found


@pytest.mark.parametrize("stage", NAMES)
def test_a_stage_reads_no_recipe_field_it_does_not_declare(stage):
    assert undeclared_reads(stage, package_sources(stage)) == {}


PLANTED = """
from refit.stages.core.scores import judged_scores

def planted(recipe, run):
    noise = run.recipe.gates.noise_sigmas  # a field of a section mix does not read
    counted = judged_scores(recipe, {"benchmarks": {}})  # a core helper reading for it
    return recipe.tokenize.model_dump(), recipe.train.seed, noise, counted  # the whole of a section it reads a field of
"""


def test_the_check_catches_a_planted_read_directly_through_a_helper_or_of_a_whole_section():
    found = undeclared_reads("mix", {**package_sources("mix"), "refit.stages.mix.planted": PLANTED})
    assert sorted(found) == ["evaluate.benchmarks", "gates.gain_estimator", "gates.noise_sigmas", "tokenize"]
    assert found["gates.noise_sigmas"] == ["refit.stages.mix.planted:5"]
    assert found["tokenize"] == ["refit.stages.mix.planted:7"]  # all of it, not only the seq_len mix declares
    by_helper = found["gates.gain_estimator"] + found["evaluate.benchmarks"]
    assert all(where.startswith("refit.stages.core.scores:") for where in by_helper)


# ----------------------------------------------------------------------------- what reruns


def rerun(recipe_path: str, workdir: str) -> list[str]:
    """The stages that would rerun, in order: each one whose input fingerprint its done marker
    does not hold gets a new marker, as its run would write, so the stages after it see it."""
    from refit.stages.pipeline import PIPELINE  # here: `_rerun_in_copy` runs this function alone

    recipe, reran = load_recipe(recipe_path), []
    for stage in PIPELINE:
        expected = stage.input_fingerprint(recipe, Path(workdir))
        if not is_done(stage.output(workdir), expected):
            stage.output(workdir).mkdir(parents=True, exist_ok=True)
            write_marker(stage.output(workdir), stage.name, expected, time.time(), stage.code_version)
            reran.append(stage.name)
    return reran


@pytest.fixture
def done_run(tmp_path) -> tuple[Path, Path]:
    """A recipe and a workdir in which every stage is done (markers only: no stage runs)."""
    write_jsonl(
        tmp_path / "data" / "new.jsonl", [{"id": f"n{i}", "text": doc["text"]} for i, doc in enumerate(NEW[:4])]
    )
    recipe = make_recipe(tmp_path, [{"name": "new", "paths": ["data/new.jsonl"], "role": "new"}])
    workdir = tmp_path / "wd"
    assert rerun(str(recipe), str(workdir)) == list(NAMES)
    return recipe, workdir


def test_settings_of_where_and_how_stages_run_and_what_only_the_audit_counts_rerun_only_what_reads_them(done_run):
    recipe, workdir = done_run
    text = recipe.read_text()
    assert rerun(str(recipe), str(workdir)) == []
    marked = {"devices": [0], "num_processes": 2, "strategy": "fsdp", "keep_checkpoints": 2, "compile": True}
    lines = "".join(f"\n  {name}: {json.dumps(value)}" for name, value in marked.items())
    recipe.write_text(
        text.replace("micro_batch_size: 2", "micro_batch_size: 2" + lines).replace("workers: 1", "workers: 2")
    )
    assert (load_recipe(recipe).train.strategy, load_recipe(recipe).curate.workers) == ("fsdp", 2)
    assert rerun(str(recipe), str(workdir)) == []  # execution only: no retraining, nor anything else
    recipe.write_text(text.replace("domain: new", "domain: new\n    weight: 2.0"))
    assert rerun(str(recipe), str(workdir)) == ["audit", "publish"]  # what the audit counts changes no score


CONFIG, REPORT = "stages/core/config.py", "stages/audit/report.py"


def _rerun_in_copy(tmp_path: Path, done_run: tuple[Path, Path], edits: dict[str, list[tuple[str, str]]]) -> list[str]:
    """`rerun` in another process on a copy of the project with these edits (file -> [(old,
    new)]), so that the real sources are never touched."""
    root = Path(tempfile.mkdtemp(dir=tmp_path)) / "refit"
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for relative, replacements in edits.items():
        text = (root / relative).read_text()
        for old, new in replacements:
            assert text.count(old) == 1, (relative, old)
            text = text.replace(old, new)
        (root / relative).write_text(text)
    script = "\n".join(
        [
            "import json, sys, time",
            "from pathlib import Path",
            "import refit.stages",
            f"assert refit.stages.__file__.startswith({str(root)!r}), refit.stages.__file__",
            "from refit.stages.core.config import load_recipe",
            "from refit.stages.core.markers import is_done, write_marker",
            inspect.getsource(rerun),
            "print(json.dumps(rerun(*sys.argv[1:])))",
        ]
    )
    recipe, workdir = done_run
    done = subprocess.run(
        [sys.executable, "-c", script, str(recipe), str(workdir)],
        env={"PYTHONPATH": str(root.parent), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_rewording_docstrings_and_comments_of_the_recipe_reruns_nothing(tmp_path, done_run):
    reworded = [
        ('"""The recipe: one YAML file is one complete run.', '"""The recipe (reworded): one file, one run.'),
        ('    """Free text for the model card."""', '    """Free text (reworded)."""'),
        ('    """AdamW betas."""', '    """The betas of AdamW (reworded)."""  # and a comment'),
        ("class TrainSpec(Section):\n", 'class TrainSpec(Section):\n    """Reworded."""\n\n'),
    ]
    assert _rerun_in_copy(tmp_path, done_run, {CONFIG: reworded}) == []


def test_a_change_to_the_search_settings_class_reruns_no_stage(tmp_path, done_run):
    changed = [
        ("    startup_trials: int = Field(default=3, ge=1)", "    startup_trials: int = Field(default=5, ge=1)"),
        ('"name at least one decay shape"', '"name a decay shape"'),  # in its validator
    ]
    assert _rerun_in_copy(tmp_path, done_run, {CONFIG: changed}) == []


def test_a_change_to_the_train_section_class_reruns_train_and_what_follows_it(tmp_path, done_run):
    changed = [("if self.sequences_per_step % per_pass:", "if self.sequences_per_step % per_pass != 0:")]  # validator
    assert _rerun_in_copy(tmp_path, done_run, {CONFIG: changed}) == ["train", "evaluate", "audit", "publish"]


def test_a_change_of_code_reruns_the_stages_that_import_it_and_a_reworded_comment_nothing(tmp_path, done_run):
    reworded = [
        ('"""The audit report a reviewer reads', '"""The report a reviewer reads (reworded)'),
        ("from __future__ import annotations\n", "from __future__ import annotations  # reworded\n"),
    ]
    assert _rerun_in_copy(tmp_path, done_run, {REPORT: reworded}) == []
    changed = [("from __future__ import annotations\n", "from __future__ import annotations\n\nREWORDED = True\n")]
    assert _rerun_in_copy(tmp_path, done_run, {REPORT: changed}) == ["audit", "publish"]
