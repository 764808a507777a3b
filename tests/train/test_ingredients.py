"""Anneal ingredients in the train stage (#26): the shared prefix trained once with a checkpoint
kept at the branch point; each ingredient the last phase again from it, in its own folder and
data order; the soup in final/ the average of their exports (uniform, or greedy on the held-out
loss); ingredient 0 the single run's weights; a SIGKILL during an ingredient and a kill while
averaging rerun to the same bytes; the recipe refuses a soup it cannot make, naming the field."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BASE_RECIPE, REPO, held_out_loss, prepare, training_processes, wait_exited, workdir_processes
from transformers import AutoModelForCausalLM

from refit.stages.core.config import RecipeError, load_recipe, parse_recipe
from refit.stages.core.markers import file_sha256, read_marker
from refit.stages.mix.stage import read_manifest
from refit.stages.train import soup as soup_module
from refit.stages.train import stage as train_stage
from refit.stages.train.ingredients import SoupUnplanned, branch_step
from refit.stages.train.soup import average_weights
from refit.stages.train.stage import (
    final_model,
    final_model_sha256,
    ingredient_models,
    read_report,
    run_train,
)

# 8 held-out rows (4 documents of each source), scored at every checkpoint
SETTINGS = dict(held_out_docs=4, validation_tokens=8 * 32)
STEP_FIELDS = ("step", "loss", "grad_norm", "lr", "phase", "sources", "val_loss")


def variant(path: Path, name: str, soup: dict | None = None, **train) -> Path:
    """A copy of the recipe beside it with a soup section and other train settings."""
    data = yaml.safe_load(path.read_text())
    data["train"].update(train)
    if soup is not None:
        data["soup"] = soup
    out = path.with_name(name)
    out.write_text(yaml.safe_dump(data))
    return out


def copy_of(workdir: Path, name: str) -> Path:
    """A copy of a prepared workdir (data stages done: their markers hold relative paths)."""
    out = workdir.with_name(name)
    shutil.copytree(workdir, out)
    return out


def lines(folder: Path) -> list[tuple]:
    """The logged steps of a training folder, field by field."""
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [tuple(m.get(field) for field in STEP_FIELDS) for m in logged]


def weights_sha256(model: Path) -> str:
    return file_sha256(model / "model.safetensors")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(recipe, workdir) of a tiny two-phase run (20 steps, the switch at step 10), data stages done."""
    return prepare(tmp_path_factory.mktemp("ingredients"), tiny_model_dir, **SETTINGS)


@pytest.fixture(scope="module")
def uniform(prepared) -> dict:
    """The recipe with 3 ingredients (uniform soup) trained in one workdir, and without a soup
    in another: {recipe, workdir, plain, report}."""
    path, data = prepared
    recipe = variant(path, "uniform.yaml", {"ingredients": 3})
    workdir, plain = copy_of(data, "wd-uniform"), copy_of(data, "wd-plain")
    report = run_train(load_recipe(recipe), workdir)
    run_train(load_recipe(path), plain)
    return {"recipe": recipe, "workdir": workdir, "plain": plain, "report": report}


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_three_ingredients_share_the_prefix_and_the_soup_is_their_average(uniform, tmp_path):
    workdir, report = uniform["workdir"], uniform["report"]
    manifest = read_manifest(workdir)
    branch, total = manifest.phases[-1].start_step, manifest.total_steps
    assert (branch, total) == (10, 20) and branch_step(load_recipe(uniform["recipe"]), manifest) == branch
    train = workdir / "train"

    # the shared run: ingredient 0 at the root, with a checkpoint at the branch point beside the usual ones
    assert sorted(p.name for p in (train / "checkpoints").iterdir()) == [
        f"step-{s:08d}" for s in (4, 8, branch, 12, 16, 20)
    ]
    assert read_marker(train / "checkpoints" / f"step-{branch:08d}")["step"] == branch
    shared = lines(train)
    assert [line[0] for line in shared] == list(range(total))
    # each other ingredient: the last phase only, from the branch point, in its own folder and order
    for i in (1, 2):
        own = train / "ingredients" / str(i)
        assert [line[0] for line in lines(own)] == list(range(branch, total))
        assert sorted(p.name for p in (own / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (12, 16, 20)]
        # checkpoints that no other ingredient (nor the shared run) resumes
        run = read_marker(train)["fingerprint"]
        assert read_marker(own / "checkpoints" / "step-00000012")["fingerprint"] == f"{run}/ingredient-{i}"
        assert {line[4] for line in lines(own)} == {"late"}
        assert lines(own)[0][1] != shared[branch][1]  # other batches at the first step after the branch
        state = json.loads((own / "final" / "trainer_state.json").read_text())
        assert state["switches"] == report["switches"] and state["step"] == total
    finals = ingredient_models(workdir)
    assert finals == [train / "ingredients" / str(i) / "final" for i in range(3)]
    assert len({weights_sha256(model) for model in finals}) == 3

    # the soup: final/ is the uniform average of the three exports, bitwise, with the single run's other files
    average_weights(finals, tmp_path / "average")
    assert weights_sha256(final_model(workdir)) == weights_sha256(tmp_path / "average")
    assert final_model_sha256(workdir)["model.safetensors"] == weights_sha256(tmp_path / "average")
    held = {"config.json", "generation_config.json", "refit_recipe.yaml", "tokenizer.json", "soup.json"}
    assert held <= {p.name for p in final_model(workdir).iterdir()}
    assert not (final_model(workdir) / "trainer_state.json").exists()  # ingredient 0's state: not the soup's
    outputs = read_marker(train)["outputs"]
    assert all(f"ingredients/{i}/final/model.safetensors" in outputs for i in range(3))
    model = AutoModelForCausalLM.from_pretrained(final_model(workdir), use_safetensors=True)
    prompt = torch.tensor([[1, 2, 3]])
    assert model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 7)

    # the report: each ingredient, the soup, and the shared prefix's tokens counted once
    per_step = manifest.tokens_per_step
    assert report["tokens"] == (branch + 3 * (total - branch)) * per_step
    assert [(i["index"], i["steps"], i["tokens"], i["anneal_tokens"]) for i in report["ingredients"]] == [
        (i, total, total * per_step, (total - branch) * per_step) for i in range(3)
    ]
    ingredient_lines = [shared, *(lines(train / "ingredients" / str(i)) for i in (1, 2))]
    assert [(i["final_loss"], i["val_loss"]) for i in report["ingredients"]] == [
        (logged[-1][1], logged[-1][6]) for logged in ingredient_lines
    ]
    soup = json.loads((final_model(workdir) / "soup.json").read_text())
    assert report["soup"] == {**soup, "shared_tokens": branch * per_step}
    assert (soup["method"], soup["kept"], soup["branch_step"], soup["val_loss"]) == ("uniform", [0, 1, 2], branch, None)
    assert [i["model"] for i in soup["ingredients"]] == [f"ingredients/{i}/final" for i in range(3)]
    assert read_report(workdir) == report and run_train(load_recipe(uniform["recipe"]), workdir) == report

    # ingredient 0 is the single run: the same steps and bitwise the same weights as the recipe without a soup
    plain = uniform["plain"] / "train"
    assert [line[:5] for line in lines(plain)] == [line[:5] for line in shared]
    assert weights_sha256(plain / "final") == weights_sha256(finals[0])
    assert not (plain / "ingredients").exists() and ingredient_models(uniform["plain"]) == []
    assert "soup" not in read_report(uniform["plain"]) and f"step-{branch:08d}" not in os.listdir(plain / "checkpoints")


# The stage in a process of its own that records which ingredients it launches and its progress
# lines, and SIGKILLs itself once the averaging has written half of the soup's first shard.
KILLED_WHILE_AVERAGING = """
import json, logging, os, signal, sys
from pathlib import Path
import safetensors.torch
from refit.stages.core.config import load_recipe
from refit.stages.train import stage

def half_a_shard_then_killed(tensors, path, metadata=None):
    Path(path).write_bytes(b"\\0" * 100)
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = half_a_shard_then_killed
launched, run_processes = open(sys.argv[3], "a"), stage._run_processes

def recorded(recipe, job_dir, on_progress, machines, ingredient=0):
    launched.write(f"{ingredient}\\n")
    launched.flush()
    run_processes(recipe, job_dir, on_progress, machines, ingredient)

stage._run_processes = recorded
logging.basicConfig(level=logging.INFO)
progress = lambda line: print(json.dumps(line), flush=True)
stage.run_train(load_recipe(sys.argv[1]), Path(sys.argv[2]), on_progress=progress)
"""


def recorded(launched: list[int]):
    """_run_processes that also appends the ingredient it launches to launched."""
    run_processes = train_stage._run_processes

    def launch(recipe, job_dir, on_progress, machines, ingredient=0):
        launched.append(ingredient)
        run_processes(recipe, job_dir, on_progress, machines, ingredient)

    return launch


def kill_when_logged(path: Path, workdir: Path, metrics: Path, step: int) -> None:
    """Run the stage in a subprocess and SIGKILL its process group once `metrics` logs `step`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "refit.flows.cli", "stage", "train", str(path), "--workdir", str(workdir)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def logged() -> bool:
        complete = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # not a line being written
        return any(json.loads(line)["step"] >= step for line in complete)

    deadline = time.time() + 300
    while not logged():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.002)
    helpers = [pid for pid in workdir_processes(workdir) if pid != process.pid]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert wait_exited(helpers) == [] and training_processes(workdir) == []


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_kill_during_an_ingredient_and_one_while_averaging_rerun_to_the_same_bytes(prepared, uniform, monkeypatch):
    """SIGKILL while ingredient 1 trains past its first checkpoint: the rerun trains ingredients 1
    (from that checkpoint) and 2 only; SIGKILLed again while averaging (half a shard written), the
    next run only averages. Every ingredient and the soup are the uninterrupted run's bytes.
    Progress lines and on_progress name the ingredient being trained.
    With keep_checkpoints 1 (execution only: the same run) the branch checkpoint is spared."""
    reference = uniform["workdir"] / "train"
    recipe = variant(uniform["recipe"], "killed.yaml", keep_checkpoints=1)
    workdir = copy_of(prepared[1], "wd-killed")
    staged = workdir / "train.tmp"
    kill_when_logged(recipe, workdir, staged / "ingredients" / "1" / "metrics.jsonl", 13)
    assert (staged / "ingredients" / "0" / "final").is_dir() and not (staged / "ingredients" / "1" / "final").exists()
    checkpoints = (staged / "ingredients" / "1" / "checkpoints").glob("step-*")
    assert [read_marker(p)["step"] for p in checkpoints if read_marker(p)] in ([12], [16])  # its own, to resume
    assert not (staged / "ingredients" / "2").exists()

    # the rerun trains ingredients 1 and 2, then is SIGKILLed by itself with half a shard of the soup written
    launched_file = workdir.parent / "launched.txt"
    rerun = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_AVERAGING, str(recipe), str(workdir), str(launched_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == -signal.SIGKILL, rerun.stderr
    launched = [int(line) for line in launched_file.read_text().split()]
    progress = [json.loads(line) for line in rerun.stdout.splitlines() if line.startswith("{")]  # not the trainers'
    assert launched == [1, 2] and {line["ingredient"] for line in progress} == {1, 2}
    assert "train ingredient 2: [####################] 20/20 steps" in rerun.stderr
    assert (staged / "final.tmp" / "shard-0.tmp").stat().st_size == 100 and read_marker(staged) is None
    monkeypatch.setattr(train_stage, "_run_processes", recorded(launched))
    report = run_train(load_recipe(recipe), workdir)
    assert launched == [1, 2]  # the ingredients were finished: only the averaging ran again

    train = workdir / "train"
    for i in range(3):
        assert weights_sha256(train / "ingredients" / str(i) / "final") == weights_sha256(
            reference / "ingredients" / str(i) / "final"
        )
    assert weights_sha256(train / "final") == weights_sha256(reference / "final")
    same = {name: d for name, d in final_model_sha256(workdir).items() if name != "refit_recipe.yaml"}  # keep: 1
    assert same == {n: d for n, d in final_model_sha256(uniform["workdir"]).items() if n != "refit_recipe.yaml"}
    assert lines(train) == lines(reference)
    for i in (1, 2):
        assert lines(train / "ingredients" / str(i)) == lines(reference / "ingredients" / str(i))
    assert sorted(p.name for p in (train / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    assert report["ingredients"] == uniform["report"]["ingredients"] and report["soup"] == uniform["report"]["soup"]


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_the_greedy_soup_keeps_only_ingredients_that_lower_the_held_out_loss(prepared, monkeypatch, tmp_path):
    """Best first by final validation loss; the second tried is made to look worse (its soup
    scored 1.0 higher than the held-out loss), so it stays out of the average."""
    recipe = variant(prepared[0], "greedy.yaml", {"ingredients": 3, "method": "greedy"})
    workdir = copy_of(prepared[1], "wd-greedy")
    real = soup_module.validation_loss_of
    scored: list[float] = []

    def second_looks_worse(*args, **kwargs):
        loss_of = real(*args, **kwargs)

        def scored_loss(folder: Path) -> float:
            scored.append(loss_of(folder))
            return scored[-1] + (1.0 if len(scored) == 2 else 0.0)

        return scored_loss

    monkeypatch.setattr(soup_module, "validation_loss_of", second_looks_worse)
    report = run_train(load_recipe(recipe), workdir)
    soup = json.loads((final_model(workdir) / "soup.json").read_text())
    finals = ingredient_models(workdir)
    val_losses = [i["val_loss"] for i in report["ingredients"]]
    order = sorted(range(3), key=lambda i: val_losses[i])
    assert soup["method"] == "greedy" and soup["order"] == order
    assert [i["val_loss"] for i in soup["ingredients"]] == val_losses
    assert len(scored) == 3 and [t["index"] for t in soup["tried"]] == order
    assert [t["soup_val_loss"] for t in soup["tried"]] == [scored[0], scored[1] + 1.0, scored[2]]
    # the best ingredient alone, scored by the stage process, as its training process scored it
    assert scored[0] == pytest.approx(val_losses[order[0]], rel=0, abs=1e-5)
    kept = [order[0]] + ([order[2]] if scored[2] < scored[0] else [])
    assert soup["kept"] == kept and order[1] not in soup["kept"]
    assert report["soup"]["kept"] == kept and soup["val_loss"] == min(scored[0], scored[2])
    average_weights([finals[i] for i in kept], tmp_path / "kept")
    assert weights_sha256(final_model(workdir)) == weights_sha256(tmp_path / "kept")
    model = AutoModelForCausalLM.from_pretrained(final_model(workdir), use_safetensors=True)
    assert held_out_loss(model, workdir) == pytest.approx(soup["val_loss"], rel=0, abs=1e-5)
    assert not list(workdir.glob("train/final.*"))  # no candidate or best left beside the soup


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_the_stage_refuses_a_soup_its_plan_cannot_make_before_training(prepared, monkeypatch):
    path, data = prepared
    manifest = read_manifest(data)
    recipe = load_recipe(variant(path, "three.yaml", {"ingredients": 3}))
    assert branch_step(load_recipe(path), manifest) is None  # no soup, no branch
    first, last = manifest.phases
    at_zero = manifest.model_copy(
        update={
            "phases": [
                first.model_copy(update={"steps": 0}),
                last.model_copy(update={"start_step": 0, "steps": manifest.total_steps}),
            ]
        }
    )
    with pytest.raises(
        SoupUnplanned, match=r"^soup.ingredients: 3 ingredients .* \(late\) starts, but it starts at step 0"
    ):
        branch_step(recipe, at_zero)
    never = manifest.model_copy(
        update={"phases": [first.model_copy(update={"steps": 20}), last.model_copy(update={"steps": 0})]}
    )
    with pytest.raises(SoupUnplanned, match="soup.ingredients: .* but it gets no steps"):
        branch_step(recipe, never)

    greedy = load_recipe(variant(path, "greedy-off.yaml", {"ingredients": 2, "method": "greedy"}))
    workdir = copy_of(data, "wd-refused")
    monkeypatch.setattr(
        train_stage, "write_validation_set", lambda *args: {"off": "no source has validation documents"}
    )
    with pytest.raises(SoupUnplanned, match=r"^soup.method: greedy .* no held-out rows"):
        run_train(greedy, workdir)
    assert training_processes(workdir) == [] and not (workdir / "train").exists()


def recipe_problems(tmp_path: Path, **sections) -> dict[str, str]:
    text = yaml.safe_dump({**BASE_RECIPE, **sections})
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, tmp_path / "recipe.yaml", check_files=False)
    return {path: message for path, _, message in caught.value.problems}


def test_the_recipe_refuses_a_soup_it_cannot_make_naming_the_field(tmp_path):
    recipe = parse_recipe(yaml.safe_dump(BASE_RECIPE), tmp_path / "recipe.yaml", check_files=False)
    assert (recipe.soup.ingredients, recipe.soup.method) == (1, "uniform")  # default: one run, no soup
    assert "soup" in train_stage.STAGE.recipe_reads
    one_phase = {"phases": [{"name": "all", "weights": {"old": 1, "new": 1}}]}
    found = recipe_problems(tmp_path, soup={"ingredients": 2}, mixture=one_phase)
    assert list(found) == ["soup.ingredients"] and "mixture.phases has one phase" in found["soup.ingredients"]
    found = recipe_problems(tmp_path, soup={"ingredients": 2, "method": "greedy"}, train={"validation_tokens": 0})
    assert list(found) == ["soup.method"] and "train.validation_tokens is 0" in found["soup.method"]
    assert list(recipe_problems(tmp_path, soup={"ingredients": 0})) == ["soup.ingredients"]
    assert list(recipe_problems(tmp_path, soup={"method": "average"})) == ["soup.method"]
    assert list(recipe_problems(tmp_path, soup={"count": 2})) == ["soup.count"]
    greedy_one = parse_recipe(
        yaml.safe_dump({**BASE_RECIPE, "soup": {"method": "greedy"}, "train": {"validation_tokens": 0}}),
        tmp_path / "recipe.yaml",
        check_files=False,
    )
    assert greedy_one.soup.ingredients == 1  # one ingredient makes no soup: nothing to score
