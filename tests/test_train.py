"""train: tiny Llama and GPT-2 through the same code; the switch where the plan says;
SIGKILL and rerun gives bitwise the same run; 2 gloo processes match 1; NaN stops cleanly;
FSDP matches DDP, resumes bitwise and on another number of processes; two machines on
loopback match one; a dead process is named; the README's scaling-out commands parse."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, free_port, metrics, prepare, train_variant, training_processes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from refit.stages.lib.config import load_recipe
from refit.stages.lib.lock import workdir_lock
from refit.stages.lib.markers import file_sha256, read_marker
from refit.stages.lib.train_loop import record_failure
from refit.stages.train import (
    FAILURE,
    Machines,
    TrainingError,
    launch_command,
    read_report,
    resolve_machines,
    run_train,
)

pytestmark = pytest.mark.slow

# 4 more documents of each source held out (the training documents stay those of the other tests),
# 65 rows of them scored at each checkpoint: 33 of old, 32 of new, and under 2 processes 33 against
# 32 rows, so one process makes a forward pass that counts for nothing
HELD_OUT = {"held_out_docs": 4, "validation_tokens": 65 * 32}


def held_out_loss(model: torch.nn.Module, workdir: Path) -> float:
    """The mean token loss of the held-out rows the run scored, one row at a time."""
    from refit.stages.lib.shards import read_shard

    rows = torch.from_numpy(read_shard(workdir / "train" / "validation.arrow").astype("int64"))
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=row[None], labels=row[None]).loss.item() for row in rows) / len(rows)


def checkpoint_model(base: Path, checkpoint: Path, scratch: Path) -> torch.nn.Module:
    """The base architecture with a checkpoint's weights, read from its DCP shards."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, scratch / "checkpoint.pt")
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    model.load_state_dict(torch.load(scratch / "checkpoint.pt", weights_only=True)["model"])
    return model


def validation_losses(workdir: Path) -> dict[int, float]:
    """The validation loss logged at each checkpoint, by checkpoint step."""
    return {m["step"] + 1: m["val_loss"] for m in metrics(workdir) if "val_loss" in m}


def final_model_loss(workdir: Path) -> float:
    return held_out_loss(AutoModelForCausalLM.from_pretrained(workdir / "train" / "final"), workdir)


def test_trains_switches_where_planned_and_exports(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, **HELD_OUT)
    report = run_train(load_recipe(path), workdir)
    manifest = json.loads((workdir / "mix" / "manifest.json").read_text())
    planned = manifest["phases"][1]["start_step"]
    assert report["switches"] == [
        {"step": planned, "phase": "late", "lr": pytest.approx(metrics(workdir)[planned]["lr"])}
    ]
    lines = metrics(workdir)
    assert [m["step"] for m in lines] == list(range(20))
    assert {m["phase"] for m in lines[:planned]} == {"general"} and {m["phase"] for m in lines[planned:]} == {"late"}
    assert sum(m["sources"]["new"] for m in lines[planned:]) == 3 * (20 - planned)  # 3:1 blend after the switch
    assert set(lines[0]) >= {"step", "tokens", "lr", "loss", "grad_norm", "phase", "tokens_per_s", "elapsed"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(workdir / "train" / "final", use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert type(model) is type(base)
    assert (workdir / "train" / "final" / "refit_recipe.yaml").is_file()
    assert sorted(p.name for p in (workdir / "train" / "checkpoints").iterdir()) == [
        f"step-{s:08d}" for s in (4, 8, 12, 16, 20)
    ]
    # the validation loss at every checkpoint, scored by the training process on the checkpoint's weights
    logged = validation_losses(workdir)
    assert list(logged) == [4, 8, 12, 16, 20]
    for step, loss in logged.items():
        model = checkpoint_model(tiny_model_dir, workdir / "train" / "checkpoints" / f"step-{step:08d}", tmp_path)
        assert loss == pytest.approx(held_out_loss(model, workdir), rel=0, abs=1e-5)
    assert logged[20] < logged[4]
    validation = report["validation"]
    assert (validation["rows"], validation["tokens"], validation["sources_without_documents"]) == (65, 65 * 32, [])
    assert {name: s["rows"] for name, s in validation["sources"].items()} == {"old": 33, "new": 32}
    assert validation["losses"] == [{"checkpoint": s, "val_loss": v} for s, v in logged.items()]
    assert run_train(load_recipe(path), workdir) == report  # done: not trained again


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_the_held_out_rows_are_the_first_validation_documents_and_sources_without_any_are_named(
    tmp_path, tiny_model_dir
):
    """Packed before training, the same bytes every time: each source's first validation
    documents in order, joined by EOS as training data is, up to train.validation_tokens; a
    source without any is named, and with none at all there is no validation pass."""
    from transformers import AutoTokenizer

    from refit.stages.curate import run_curate, validation_texts
    from refit.stages.lib.shards import read_shard
    from refit.stages.train import write_validation_set

    path, workdir = prepare(tmp_path / "new-only", tiny_model_dir, run_data_stages=False, held_out_docs=3)
    spec = yaml.safe_load(path.read_text())
    del spec["sources"][0]["validation_paths"]  # old holds none out (validation_fraction 0)
    path.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(path)
    run_curate(recipe, workdir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = validation_texts(workdir, "new")
    stream = [
        t for doc in docs for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    out = tmp_path / "validation.arrow"
    held_out = write_validation_set(recipe, workdir, out)
    assert held_out["sources_without_documents"] == ["old"] and list(held_out["sources"]) == ["new"]
    assert held_out["rows"] == len(stream) // 32 and held_out["sources"]["new"]["docs"] == len(docs) == 3
    assert read_shard(out).flatten().tolist() == stream[: held_out["rows"] * 32]
    packed = out.read_bytes()
    assert write_validation_set(recipe, workdir, out) == held_out and out.read_bytes() == packed
    capped = recipe.model_copy(update={"train": recipe.train.model_copy(update={"validation_tokens": 70})})
    assert write_validation_set(capped, workdir, out)["sources"]["new"] == {"docs": 1, "held_out_docs": 3, "rows": 2}
    assert read_shard(out).flatten().tolist() == stream[:64]

    bare, bare_workdir = prepare(tmp_path / "none", tiny_model_dir, run_data_stages=False)
    run_curate(load_recipe(bare), bare_workdir)
    off = write_validation_set(load_recipe(bare), bare_workdir, out)
    assert off == {"off": "no source has validation documents (curate held none out)"} and not out.exists()


def kill_at_step(
    path: Path,
    workdir: Path,
    step: int,
    *options: str,
    whole_group: bool = True,
    launcher: str = "refit.flows.cli stage train",
) -> None:
    """Run the stage in a subprocess and SIGKILL its process group (or the stage process
    alone) once `step` is logged: a machine crash, as far as the workdir can tell. The
    training processes, in sessions of their own, must die with it."""
    process = subprocess.Popen(
        [sys.executable, "-m", *launcher.split(), str(path), "--workdir", str(workdir), *options],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = workdir / "train.tmp" / "metrics.jsonl"  # the run in progress, staged
    deadline = time.time() + 300
    while not (log.exists() and any(json.loads(line)["step"] >= step for line in log.read_text().splitlines())):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.002)
    if whole_group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10
    while training_processes(workdir) and time.time() < deadline:
        time.sleep(0.05)
    assert training_processes(workdir) == [], "training processes outlived the killed stage"


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)  # resuming knows no architecture
def test_sigkill_before_and_after_the_switch_resumes_bitwise(tmp_path, tiny_model_dir):
    reference_path, reference = prepare(tmp_path / "ref", tiny_model_dir, **HELD_OUT)
    run_train(load_recipe(reference_path), reference)
    expected = metrics(reference)
    switch = json.loads((reference / "mix" / "manifest.json").read_text())["phases"][1]["start_step"]
    path, workdir = prepare(tmp_path / "killed", tiny_model_dir, **HELD_OUT)
    kill_at_step(path, workdir, switch - 1)  # just before the switch
    kill_at_step(path, workdir, switch + 1)  # just after it
    run_train(load_recipe(path), workdir)
    got = metrics(workdir)
    assert [(m["step"], m["loss"], m["lr"], m["phase"], m.get("val_loss")) for m in got] == [
        (m["step"], m["loss"], m["lr"], m["phase"], m.get("val_loss")) for m in expected
    ]
    final, ref = (
        load_file(workdir / "train/final/model.safetensors"),
        load_file(reference / "train/final/model.safetensors"),
    )
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_forced_retraining_keeps_the_last_model_until_the_new_one_is_complete(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir)
    report = run_train(load_recipe(path), workdir)
    final = workdir / "train" / "final"
    before = {p.name: file_sha256(p) for p in final.iterdir()}
    marker = read_marker(workdir / "train")
    kill_at_step(path, workdir, 3, "--force")  # a forced rerun dies midway
    assert {p.name: file_sha256(p) for p in final.iterdir()} == before and read_marker(workdir / "train") == marker
    assert run_train(load_recipe(path), workdir) == report  # still the finished run: nothing to do
    assert run_train(load_recipe(path), workdir, force=True)["steps"] == report["steps"]
    assert read_marker(workdir / "train")["finished"] > marker["finished"] and not (workdir / "train.tmp").exists()


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_manifest_that_disagrees_with_the_lr_trigger_stops_training(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir)
    manifest_file = workdir / "mix" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    planned = manifest["phases"][1]["start_step"]
    # edited by hand after mix, consistently, but no longer the schedule's: the switch two steps late
    manifest["phases"][0]["steps"] += 2
    manifest["phases"][1]["start_step"] += 2
    manifest["phases"][1]["steps"] -= 2
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match=rf"fired at step {planned}, but the manifest planned step {planned + 2}"):
        run_train(load_recipe(path), workdir)
    assert not (workdir / "train").exists()


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_two_gloo_processes_match_one(tmp_path, tiny_model_dir):
    one_path, one = prepare(tmp_path / "one", tiny_model_dir, **HELD_OUT)
    two_path, two = prepare(tmp_path / "two", tiny_model_dir, num_processes=2, **HELD_OUT)
    run_train(load_recipe(one_path), one)
    run_train(load_recipe(two_path), two)
    losses_one, losses_two = [m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)]
    assert losses_two == pytest.approx(losses_one, rel=1e-4, abs=1e-5)
    # the held-out rows split over 2 processes (33 and 32) score what one process scores on the same weights
    assert validation_losses(two)[20] == pytest.approx(final_model_loss(two), rel=0, abs=1e-5)
    assert list(validation_losses(two).values()) == pytest.approx(list(validation_losses(one).values()), rel=1e-4)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, capfd):
    path, workdir = prepare(tmp_path, tiny_model_dir, max_lr=1e30, grad_clip=1e30)
    with pytest.raises(
        TrainingError, match=r"training failed: FloatingPointError: non-finite loss .* at step \d+ \(LR"
    ):
        run_train(
            load_recipe(path), workdir
        )  # the reason reaches the caller (a flow, the sweep table), not just the log
    assert "non-finite loss" in capfd.readouterr().err
    staged = workdir / "train.tmp"  # kept for a rerun to resume from; nothing swapped into train/
    checkpoints = sorted(p.name for p in (staged / "checkpoints").glob("step-*") if (p / "_SUCCESS.json").exists())
    assert not (workdir / "train").exists() and not (staged / "_SUCCESS.json").exists()
    assert all(m["loss"] == m["loss"] for m in metrics(workdir, "train.tmp"))  # no NaN was ever logged as a step
    assert len(checkpoints) == len(metrics(workdir, "train.tmp")) // 4


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_cancelling_the_stage_stops_every_training_process(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, num_processes=2)
    process = subprocess.Popen(
        [sys.executable, "-m", "refit.flows.cli", "stage", "train", str(path), "--workdir", str(workdir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = workdir / "train.tmp" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    assert len(training_processes(workdir)) >= 2  # both ranks are running
    process.send_signal(signal.SIGINT)  # what Ctrl-C, or a flow cancellation, delivers
    process.wait(timeout=60)
    deadline = time.time() + 30
    while training_processes(workdir) and time.time() < deadline:
        time.sleep(0.1)
    assert training_processes(workdir) == []


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_both_ranks_die_with_a_killed_stage_process_and_free_the_workdir(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, num_processes=2)
    kill_at_step(path, workdir, 0, whole_group=False)  # the stage process alone, as `kill -9 PID` does
    with workdir_lock(workdir, "the rerun"):
        pass


def test_only_the_first_failing_rank_leaves_its_reason(tmp_path):
    record_failure(tmp_path / FAILURE, RuntimeError("rank 1: out of memory"))
    record_failure(tmp_path / FAILURE, RuntimeError("rank 0: connection closed by peer"))
    assert (tmp_path / FAILURE).read_text() == "RuntimeError: rank 1: out of memory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAILURE]


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_base_model_that_needs_its_own_code_is_refused_in_one_line(tmp_path, tiny_model_dir):
    base = tmp_path / "custom-base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config |= {"model_type": "refit_custom", "auto_map": {"AutoConfig": "custom.Config"}}
    (base / "config.json").write_text(json.dumps(config))
    (base / "custom.py").write_text("raise SystemExit('the custom code ran')\n")
    path, workdir = prepare(tmp_path, base)
    result = subprocess.run(
        [sys.executable, "-m", "refit.flows.cli", "stage", "train", str(path), "--workdir", str(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {base} needs its own Python code to load")
    assert "base_model.trust_remote_code is false" in result.stderr
    assert not training_processes(workdir) and not (workdir / "train.tmp").exists()


@pytest.mark.parametrize("tiny_model_dir", ["gpt2"], indirect=True)
def test_optional_optimizer_state_is_loaded(tmp_path, tiny_model_dir):
    """AdamW's moments after one step from a loaded state are exactly beta x loaded + what one
    step from scratch adds (same weights, same batch, so the same gradient): the state was
    loaded as saved, not perturbed, reset or partly lost."""
    fresh_path, fresh = prepare(tmp_path / "fresh", tiny_model_dir, checkpoint_every=1)
    run_train(load_recipe(fresh_path), fresh)
    saved = fresh / "train" / "checkpoints" / "step-00000020"  # its optimizer part is loaded
    warm_path, warm = prepare(tmp_path / "warm", tiny_model_dir, checkpoint_every=1, optimizer_state=str(saved))
    run_train(load_recipe(warm_path), warm)
    assert metrics(fresh)[0]["loss"] == metrics(warm)[0]["loss"]  # same weights and data at step 0

    def state(workdir: Path, name: str) -> dict:  # a DCP checkpoint's optimizer state, keyed by parameter name
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(workdir / "train" / "checkpoints" / name, tmp_path / "state.pt")
        return torch.load(tmp_path / "state.pt", weights_only=True)["optimizer"]["state"]

    loaded, one_step, warm_step = (
        state(fresh, "step-00000020"),
        state(fresh, "step-00000001"),
        state(warm, "step-00000001"),
    )
    beta1, beta2 = load_recipe(warm_path).train.adam_betas
    assert loaded.keys() == warm_step.keys() and loaded
    for key in loaded:
        assert float(warm_step[key]["step"]) == float(loaded[key]["step"]) + 1
        expected_m = beta1 * loaded[key]["exp_avg"] + one_step[key]["exp_avg"]
        expected_v = beta2 * loaded[key]["exp_avg_sq"] + one_step[key]["exp_avg_sq"]
        assert torch.allclose(warm_step[key]["exp_avg"], expected_m, rtol=1e-5, atol=1e-9)
        assert torch.allclose(warm_step[key]["exp_avg_sq"], expected_v, rtol=1e-5, atol=1e-12)


def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "train" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(recipe, workdir) of an uninterrupted FSDP run with 2 processes, which several tests compare against."""
    path, workdir = prepare(
        tmp_path_factory.mktemp("fsdp"), tiny_model_dir, strategy="fsdp", num_processes=2, **HELD_OUT
    )
    run_train(load_recipe(path), workdir)
    return path, workdir


def test_fsdp_matches_ddp_with_two_processes(tmp_path, tiny_model_dir, fsdp_run):
    ddp_path, ddp = prepare(tmp_path, tiny_model_dir, num_processes=2, **HELD_OUT)
    run_train(load_recipe(ddp_path), ddp)
    _, fsdp = fsdp_run
    assert [m["loss"] for m in metrics(fsdp)] == pytest.approx([m["loss"] for m in metrics(ddp)], rel=0, abs=1e-5)
    assert validation_losses(fsdp)[20] == pytest.approx(final_model_loss(fsdp), rel=0, abs=1e-5)
    assert list(validation_losses(fsdp).values()) == pytest.approx(list(validation_losses(ddp).values()), abs=1e-5)
    planned = json.loads((fsdp / "mix" / "manifest.json").read_text())["phases"][1]["start_step"]
    report = json.loads((fsdp / "train" / "report.json").read_text())
    assert [s["step"] for s in report["switches"]] == [planned] and report["strategy"] == "fsdp"
    ours, theirs = final_weights(fsdp), final_weights(ddp)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-5) for k in ours)
    # a loadable Hugging Face checkpoint of the same architecture
    model = AutoModelForCausalLM.from_pretrained(fsdp / "train" / "final", use_safetensors=True)
    assert type(model) is type(AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True))
    # every process wrote its shard of the checkpoint; each file's sha256 was recorded once, when written
    checkpoint = fsdp / "train" / "checkpoints" / "step-00000020"
    outputs = read_marker(checkpoint)["outputs"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rng-0.pt", "rng-1.pt", "trainer_state.json"} <= set(outputs)
    assert all(outputs[name] == file_sha256(checkpoint / name) for name in outputs)
    stage_outputs = read_marker(fsdp / "train")["outputs"]
    assert stage_outputs["checkpoints/step-00000020/__1_0.distcp"] == outputs["__1_0.distcp"]
    assert stage_outputs["final/model.safetensors"] == file_sha256(fsdp / "train" / "final" / "model.safetensors")


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_sigkill_under_fsdp_then_rerun_is_bitwise_equal(tmp_path, tiny_model_dir, fsdp_run):
    _, reference = fsdp_run
    path, workdir = prepare(tmp_path, tiny_model_dir, strategy="fsdp", num_processes=2, keep_checkpoints=2, **HELD_OUT)
    kill_at_step(path, workdir, 13, launcher="refit.flows.train_launcher")
    assert not (workdir / "train").exists()  # nothing swapped in before the run is complete
    run_train(load_recipe(path), workdir)
    assert [(m["step"], m["loss"], m["lr"], m["phase"], m.get("val_loss")) for m in metrics(workdir)] == [
        (m["step"], m["loss"], m["lr"], m["phase"], m.get("val_loss")) for m in metrics(reference)
    ]
    ours, theirs = final_weights(workdir), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sorted(p.name for p in (workdir / "train" / "checkpoints").iterdir()) == ["step-00000016", "step-00000020"]


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
@pytest.mark.parametrize("before, after", [((2, "fsdp"), (1, "ddp")), ((1, "ddp"), (2, "fsdp"))])
def test_resume_on_another_number_of_processes(tmp_path, tiny_model_dir, fsdp_run, before, after):
    """DCP reshards the checkpoint; the data order is a function of the step alone, so the
    losses go on as the uninterrupted run's, within the tolerance of 1 against 2 processes."""
    _, reference = fsdp_run
    path, workdir = prepare(tmp_path, tiny_model_dir, num_processes=before[0], strategy=before[1], **HELD_OUT)
    kill_at_step(path, workdir, 9, launcher="refit.flows.train_launcher")  # the checkpoint of step 8 is complete
    resumed = train_variant(path, "resumed.yaml", num_processes=after[0], strategy=after[1])
    report = run_train(load_recipe(resumed), workdir)
    assert report["processes"] == after[0] and report["strategy"] == after[1]
    got, expected = metrics(workdir), metrics(reference)
    assert [m["step"] for m in got] == list(range(20)) and [m["phase"] for m in got] == [m["phase"] for m in expected]
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in expected], rel=1e-4, abs=1e-5)
    ours, theirs = final_weights(workdir), final_weights(reference)
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-5) for k in theirs)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_two_machines_on_loopback_match_one_machine(tmp_path, tiny_model_dir, fsdp_run):
    """Two launchers, as srun or torchrun would start one per machine, one process each."""
    _, reference = fsdp_run
    machines = dict(num_processes=2, num_machines=2, main_process_ip="127.0.0.1", main_process_port=free_port())
    path, workdir = prepare(tmp_path, tiny_model_dir, strategy="fsdp", **machines, **HELD_OUT)
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refit.flows.train_launcher",
                str(train_variant(path, f"machine{rank}.yaml", machine_rank=rank)),
            ]
            + ["--workdir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (1, 0)  # the other machine may well start first
    ]
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    assert json.loads((workdir / "train" / "report.json").read_text())["machines"] == 2
    assert [m["loss"] for m in metrics(workdir)] == [m["loss"] for m in metrics(reference)]
    ours, theirs = final_weights(workdir), final_weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_machines_come_from_the_recipe_or_the_environment(tmp_path, tiny_model_dir):
    path, _ = prepare(tmp_path, tiny_model_dir, run_data_stages=False, num_processes=2)
    spec = load_recipe(path).train
    assert resolve_machines(spec, {}) == Machines(1, 0, None, None)
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "node-a"}
    assert resolve_machines(spec, slurm) == Machines(2, 1, "node-a", 29500)
    assert resolve_machines(spec, {**slurm, "MASTER_PORT": "29555"}).main_port == 29555
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1"}
    assert resolve_machines(spec, {**torchrun, "MASTER_ADDR": "node-b"}).main_ip == "node-b"
    with pytest.raises(ValueError, match="train.main_process_ip: the recipe asks for 2 machines"):
        resolve_machines(spec, torchrun)
    pinned = load_recipe(train_variant(path, "pinned.yaml", num_machines=2, machine_rank=0, main_process_ip="10.0.0.1"))
    assert resolve_machines(pinned.train, slurm) == Machines(2, 0, "10.0.0.1", 29500)
    from accelerate.commands.launch import launch_command_parser

    command = launch_command(16, tmp_path, Machines(2, 1, "10.0.0.1", 29500))
    start = command.index("accelerate.commands.launch") + 1  # started through lifeline.py
    args = launch_command_parser().parse_args(command[start:])
    assert (args.num_machines, args.machine_rank, args.main_process_ip) == (2, 1, "10.0.0.1")
    assert args.main_process_port == 29500
    assert args.num_processes == 16 and args.multi_gpu and args.training_script == "refit.stages.lib.train_loop"


def rank_pid(workdir: Path, rank: int) -> int | None:
    for pid in training_processes(workdir):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    return None


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_killed_process_stops_the_others_naming_it_and_the_rerun_resumes(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, strategy="fsdp", num_processes=2)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "refit.flows.train_launcher", str(path), "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log, deadline = workdir / "train.tmp" / "metrics.jsonl", time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 6):
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.05)
    victim = rank_pid(workdir, 1)
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    _, err = launcher.communicate(timeout=120)
    assert time.time() - killed < 60 and launcher.returncode != 0
    assert f"training process rank 1 (pid {victim} on " in err and "was killed by SIGKILL" in err, err[-3000:]
    assert training_processes(workdir) == []
    report = run_train(load_recipe(path), workdir)  # resumes from the checkpoint of step 4
    assert report["steps"] == 20 and [m["step"] for m in metrics(workdir)] == list(range(20))


def test_a_silent_process_is_named_after_the_heartbeat_timeout(tmp_path):
    """Across machines no launcher sees the other's processes die: the heartbeats do."""
    from refit.stages.lib.heartbeat import Heartbeat

    verdicts = []
    watcher = Heartbeat(tmp_path, 0, 3, timeout=1.5, on_dead=verdicts.append, every=0.1).start()
    finished = Heartbeat(tmp_path, 1, 3, timeout=1.5, on_dead=verdicts.append, every=0.1).start()
    silent = Heartbeat(tmp_path, 2, 3, timeout=1.5, on_dead=verdicts.append, every=0.1).start()
    silent.step = 7
    time.sleep(0.5)
    finished.finish()  # ended normally: never declared dead
    silent._stop.set()  # beats no more, as a process that was killed or hangs
    silent._thread.join()
    stopped = time.time()
    while not verdicts and time.time() - stopped < 10:
        time.sleep(0.05)
    assert time.time() - stopped >= 1.0 and len(verdicts) == 1
    assert verdicts[0].startswith(f"training process rank 2 (pid {os.getpid()} on ") and "last at step 7" in verdicts[0]
    watcher.finish()


def test_out_of_memory_names_the_step_the_memory_and_what_to_change(tmp_path, tiny_model_dir):
    from refit.stages.lib.train_loop import out_of_memory

    path, _ = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity")
    message = str(out_of_memory(error, 7, load_recipe(path)))
    assert message.startswith("out of GPU memory at step 7: asked for 2.50 GiB")
    for hint in ("train.micro_batch_size (now 2)", "train.activation_checkpointing: true", "train.strategy: fsdp"):
        assert hint in message


def test_export_is_streamed_as_sharded_safetensors_that_transformers_loads(tmp_path, tiny_model_dir):
    from refit.stages.lib.train_loop import export_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    digests = export_weights(model, tmp_path, shard_bytes=20_000)  # a few tensors per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(digests) == len(set(index["weight_map"].values())) > 2
    assert all(digests[name] == file_sha256(tmp_path / name) for name in digests)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def scaling_out_commands() -> list[list[str]]:
    """The shell commands of the README's "Scaling out" section, continuation lines joined."""
    import re

    section = (REPO / "README.md").read_text().split("## Scaling out")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(" #")[0]) for line in lines if line.strip()]


def test_the_readme_scaling_out_commands_parse_as_written():
    from torch.distributed.run import get_args_parser

    from refit.flows.cli import build_parser
    from refit.flows.train_launcher import launcher_parser

    commands = scaling_out_commands()
    assert {c[0] for c in commands} == {"refit", "sbatch", "torchrun"}
    for command in commands:
        if command[0] == "refit":
            build_parser().parse_args(command[1:])
        elif command[0] == "sbatch":
            assert command[1:] == ["--wait", "deployments/train.sbatch", "deployments/my.yaml"]
        else:
            args = get_args_parser().parse_args(command[1:])
            assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.module) == ("2", "1", "c10d", True)
            assert args.training_script == "refit.flows.train_launcher"
            assert launcher_parser().parse_args(args.training_script_args).recipe == "deployments/my.yaml"
    script = REPO / "deployments" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = script.read_text().splitlines()
    srun = next(line for line in lines if line.startswith("srun "))
    assert shlex.split(srun)[2:] == [".venv/bin/python", "-m", "refit.flows.train_launcher", "$RECIPE", "$@"]
    then = shlex.split(lines[lines.index(srun) + 1])  # the rest of the refresh, on the allocation's first machine
    assert then[0] == ".venv/bin/refit" and build_parser().parse_args(then[1:]).command == "run"


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_two_machines_through_torchrun_rendezvous_match_one_machine(tmp_path, tiny_model_dir, fsdp_run):
    """The README's torchrun command on two "machines" (loopback): torchrun's c10d rendezvous
    ranks the launchers and tells them machine 0's address; the recipe names no machine."""
    _, reference = fsdp_run
    path, workdir = prepare(
        tmp_path, tiny_model_dir, strategy="fsdp", num_processes=2, main_process_port=free_port(), **HELD_OUT
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test"]
    torchrun += ["-m", "refit.flows.train_launcher", str(path), "--workdir", str(workdir)]
    launchers = [subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in "ab"]
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    assert json.loads((workdir / "train" / "report.json").read_text())["machines"] == 2
    assert [m["loss"] for m in metrics(workdir)] == [m["loss"] for m in metrics(reference)]


def few_steps(model_dir: Path, recipe_path: Path, steps: int = 3, count_forwards: bool = False) -> tuple[list, int]:
    """Per-step losses of a few AdamW steps on fixed random batches of the model prepared as
    the train stage prepares it for the recipe (one process) and, with count_forwards, how
    many times the modules inside its decoder layers started a forward pass (checkpointing
    wraps a layer's forward, not its hooks, so a recompute shows inside the layer; counted
    on entry, because the recompute stops once it has rebuilt every activation the backward
    pass needs)."""
    from refit.stages.lib.train_loop import decoder_layers, prepare_model

    torch.manual_seed(0)  # the same dropout masks in every run (GPT-2 has dropout)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32)
    model = prepare_model(model, load_recipe(recipe_path), torch.device("cpu"))
    forwards = []
    for layer in decoder_layers(model) if count_forwards else ():
        for part in layer.children():
            part.register_forward_pre_hook(lambda *_: forwards.append(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    batches = torch.randint(0, model.config.vocab_size, (steps, 2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, len(forwards)


def test_activation_checkpointing_recomputes_each_decoder_layer_with_the_same_losses(tmp_path, tiny_model_dir):
    """Each decoder layer's insides run forward twice per step (again in the backward pass,
    from the layer's input alone) and the losses stay those of the run without it, to fp32
    rounding (1e-6)."""
    eager, _ = prepare(tmp_path / "eager", tiny_model_dir, run_data_stages=False)
    checkpointed, _ = prepare(tmp_path / "ac", tiny_model_dir, run_data_stages=False, activation_checkpointing=True)
    losses, forwards = few_steps(tiny_model_dir, eager, count_forwards=True)
    ac_losses, ac_forwards = few_steps(tiny_model_dir, checkpointed, count_forwards=True)
    assert forwards > 0 and ac_forwards == 2 * forwards
    assert ac_losses == pytest.approx(losses, rel=0, abs=1e-6)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)  # no dropout: inductor draws its own masks
def test_compile_runs_the_decoder_layers_through_inductor_with_the_eager_losses(tmp_path, tiny_model_dir):
    """torch.compile's default backend (inductor, which builds C++ kernels with the machine's
    compiler) compiles the layers; the losses stay within 1e-5 of eager."""
    from torch._dynamo.utils import counters

    from refit.stages.lib.train_loop import compile_summary

    eager, _ = prepare(tmp_path / "eager", tiny_model_dir, run_data_stages=False)
    compiled, _ = prepare(tmp_path / "compiled", tiny_model_dir, run_data_stages=False, compile=True)
    losses, _ = few_steps(tiny_model_dir, eager)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled_losses, _ = few_steps(tiny_model_dir, compiled)
        assert compile_summary() == {"graphs": 2, "graph_breaks": {}}  # one graph per layer, nothing left eager
        assert counters["aot_autograd"]["ok"] == 2  # their backward passes compiled too
        # inductor built (or, from its on-disk cache, reused) C++ kernels for the forward and backward graphs
        assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 2
    finally:
        torch._dynamo.reset()
    assert compiled_losses == pytest.approx(losses, rel=0, abs=1e-5)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_fsdp_with_activation_checkpointing_and_compile_keeps_the_losses(tmp_path, tiny_model_dir, fsdp_run):
    """Both options on, FSDP with 2 processes: the layers are compiled in the training
    processes (the report says what torch.compile made of them) and the 20 losses stay
    within 1e-5 of the eager run's (which also scored its held-out rows at each checkpoint:
    that pass changes nothing in the training)."""
    _, reference = fsdp_run
    options = dict(activation_checkpointing=True, compile=True, validation_tokens=0)
    path, workdir = prepare(tmp_path, tiny_model_dir, strategy="fsdp", num_processes=2, **options)
    report = run_train(load_recipe(path), workdir)
    assert report["validation"] == {"off": "train.validation_tokens is 0"} and validation_losses(workdir) == {}
    # both layers share one graph here (FSDP's layers are traced with their parameters as inputs)
    assert report["compiled"]["graphs"] >= 1 and report["compiled"]["graph_breaks"] == {}, report["compiled"]
    losses, eager = [m["loss"] for m in metrics(workdir)], [m["loss"] for m in metrics(reference)]
    assert losses == pytest.approx(eager, rel=0, abs=1e-5)
    assert [s["step"] for s in report["switches"]] == [s["step"] for s in read_report(reference)["switches"]]


def test_the_fsdp_demo_recipe_is_the_demo_with_fsdp_over_two_processes():
    """deployments/demo-fsdp.yaml differs from the demo recipe in its identity and how it trains only."""
    demo, fsdp = (
        load_recipe(REPO / "deployments" / name, check_files=False) for name in ("demo.yaml", "demo-fsdp.yaml")
    )
    assert (fsdp.train.strategy, fsdp.train.num_processes, fsdp.name) == ("fsdp", 2, "demo-fsdp")
    assert Path(fsdp.workdir).name == "demo-fsdp"
    identity = {"name", "description", "workdir"}
    how = {"train": {"strategy", "num_processes"}}
    assert fsdp.model_dump(exclude={*identity, *how}) == demo.model_dump(exclude={*identity, *how})
    assert fsdp.train.model_dump(exclude=how["train"]) == demo.train.model_dump(exclude=how["train"])
