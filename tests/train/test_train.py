"""train: tiny Llama and GPT-2 through the same code; the switch where the plan says; the
validation loss at every checkpoint; SIGKILL and rerun gives bitwise the same run; 2 gloo
processes match 1; NaN stops cleanly; cancelling stops every process; a forced rerun keeps the
last model until the new one is complete; the optimizer state is loaded as saved; the
optimizer warm-up fills the moments, leaves the weights, and resumes bitwise."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    HELD_OUT,
    REPO,
    final_model_loss,
    held_out_loss,
    kill_at_step,
    metrics,
    prepare,
    rewrite_output,
    training_processes,
    validation_losses,
    wait_exited,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from refit.stages.core.config import load_recipe
from refit.stages.core.lock import WorkdirBusy, workdir_lock
from refit.stages.core.markers import file_sha256, read_marker
from refit.stages.mix.manifest import load_manifest
from refit.stages.train.loop import record_failure
from refit.stages.train.stage import (
    FAILURE,
    TrainingError,
    failure_reason,
    run_train,
)

pytestmark = pytest.mark.slow


def checkpoint_model(base: Path, checkpoint: Path, scratch: Path) -> torch.nn.Module:
    """The base architecture with a checkpoint's weights, read from its DCP shards."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, scratch / "checkpoint.pt")
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    model.load_state_dict(torch.load(scratch / "checkpoint.pt", weights_only=True)["model"])
    return model


def optimizer_state(checkpoint: Path, scratch: Path) -> dict:
    """A DCP checkpoint's AdamW state (step, exp_avg, exp_avg_sq), keyed by parameter name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, scratch / "state.pt")
    return torch.load(scratch / "state.pt", weights_only=True)["optimizer"]["state"]


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)  # GPT-2 trains in test_architectures.py
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

    from refit.stages.core.shards import read_shard
    from refit.stages.curate.stage import run_curate, validation_texts
    from refit.stages.train.stage import write_validation_set

    uncapped = dict(held_out_docs=3, validation_tokens=1 << 15)  # more than the 3 documents hold
    path, workdir = prepare(tmp_path / "new-only", tiny_model_dir, run_data_stages=False, **uncapped)
    spec = yaml.safe_load(path.read_text())
    del spec["sources"][0]["validation_paths"]  # old holds none out (validation_fraction 0)
    path.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(path)
    run_curate(recipe, workdir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = validation_texts(workdir, "new", 10)  # all 3
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
    rewrite_output(workdir / "mix", "manifest.json", json.dumps(manifest))
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
    assert wait_exited(training_processes(workdir), 30) == []
    assert training_processes(workdir) == []


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_both_ranks_die_with_a_killed_stage_process_and_free_the_workdir(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, num_processes=2)
    kill_at_step(path, workdir, 0, whole_group=False)  # the stage process alone, as `kill -9 PID` does
    deadline = time.time() + 10  # the kernel releases the lock once the dead processes' files are closed
    while True:
        try:
            with workdir_lock(workdir, "the rerun"):
                return
        except WorkdirBusy:
            assert time.time() < deadline, "the workdir stayed locked after the stage and its helpers died"
            time.sleep(0.1)


def test_only_the_first_failing_rank_leaves_its_reason(tmp_path):
    record_failure(tmp_path / FAILURE, RuntimeError("rank 1: out of memory"))
    record_failure(tmp_path / FAILURE, RuntimeError("rank 0: connection closed by peer"))
    assert (tmp_path / FAILURE).read_text() == "RuntimeError: rank 1: out of memory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAILURE]


def test_a_single_training_process_killed_by_a_signal_is_named(tmp_path):
    """One process runs without a launcher (no torchrun summary to read): its own exit status says it."""
    assert failure_reason(tmp_path, "", -signal.SIGKILL).startswith("the training process was killed by SIGKILL")
    assert failure_reason(tmp_path, "", 1) == "exit code 1; see the log above"


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
    fresh_path, fresh = prepare(tmp_path / "fresh", tiny_model_dir, steps=6, checkpoint_every=1)
    run_train(load_recipe(fresh_path), fresh)
    saved = fresh / "train" / "checkpoints" / "step-00000006"  # its optimizer part is loaded
    loading = dict(steps=6, checkpoint_every=1, optimizer_state=str(saved))
    warm_path, warm = prepare(tmp_path / "warm", tiny_model_dir, **loading)
    run_train(load_recipe(warm_path), warm)
    assert metrics(fresh)[0]["loss"] == metrics(warm)[0]["loss"]  # same weights and data at step 0

    loaded, one_step, warm_step = (
        optimizer_state(fresh / "train" / "checkpoints" / "step-00000006", tmp_path),
        optimizer_state(fresh / "train" / "checkpoints" / "step-00000001", tmp_path),
        optimizer_state(warm / "train" / "checkpoints" / "step-00000001", tmp_path),
    )
    beta1, beta2 = load_recipe(warm_path).train.adam_betas
    assert loaded.keys() == warm_step.keys() and loaded
    for key in loaded:
        assert float(warm_step[key]["step"]) == float(loaded[key]["step"]) + 1
        expected_m = beta1 * loaded[key]["exp_avg"] + one_step[key]["exp_avg"]
        expected_v = beta2 * loaded[key]["exp_avg_sq"] + one_step[key]["exp_avg_sq"]
        assert torch.allclose(warm_step[key]["exp_avg"], expected_m, rtol=1e-5, atol=1e-9)
        assert torch.allclose(warm_step[key]["exp_avg_sq"], expected_v, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_the_optimizer_warmup_fills_the_moments_and_changes_neither_weights_nor_schedule(tmp_path, tiny_model_dir):
    """train.optimizer_warmup_steps: after W steps at LR 0, AdamW's moments are the running
    averages of the clipped gradients of the base weights on the warm-up's batches, its step
    count is W, and the weights are bitwise the base's; the scheduled steps are a run's without
    a warm-up (the same LRs and switch, the same loss at step 0); the warm-up's steps are
    flagged in the log and counted in the report."""
    from refit.stages.mix.stage import manifest_path
    from refit.stages.train.sampler import Sampler
    from refit.stages.train.stage import read_metrics

    cold_path, cold = prepare(tmp_path / "cold", tiny_model_dir, steps=8, checkpoint_every=2)
    warm_path, warm = prepare(tmp_path / "warm", tiny_model_dir, steps=8, checkpoint_every=2, optimizer_warmup_steps=4)
    cold_report, report = run_train(load_recipe(cold_path), cold), run_train(load_recipe(warm_path), warm)
    checkpoints = warm / "train" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step-00000000-warmup-00000002",
        "step-00000000-warmup-00000004",
        *(f"step-{s:08d}" for s in (2, 4, 6, 8)),
    ]
    logged, scheduled = metrics(warm), read_metrics(warm)
    assert [(m["optimizer_warmup_step"], m["lr"], m["phase"], "step" in m) for m in logged[:4]] == [
        (w, 0.0, "general", False) for w in range(4)
    ]
    assert scheduled == logged[4:] and [m["step"] for m in scheduled] == list(range(8))
    assert [m["lr"] for m in scheduled] == [m["lr"] for m in read_metrics(cold)]
    assert scheduled[0]["loss"] == read_metrics(cold)[0]["loss"]  # the base's weights on the same batch
    assert report["switches"] == cold_report["switches"] and report["steps"] == cold_report["steps"] == 8
    assert (report["optimizer_warmup_steps"], report["optimizer_warmup_tokens"]) == (4, 4 * 4 * 32)
    assert (cold_report["optimizer_warmup_steps"], cold_report["optimizer_warmup_tokens"]) == (0, 0)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    for name in ("step-00000000-warmup-00000002", "step-00000000-warmup-00000004"):
        weights = checkpoint_model(tiny_model_dir, checkpoints / name, tmp_path).state_dict()
        assert all(torch.equal(weights[key], value) for key, value in base.state_dict().items())

    recipe = load_recipe(warm_path)
    sampler = Sampler(load_manifest(manifest_path(warm)), warm, 4)
    beta1, beta2 = recipe.train.adam_betas
    expected = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in base.named_parameters()}
    base.train()
    for warmup_step in range(4):  # as the loop steps: two micro-batches of 2, the mean loss, clipped
        for micro_batch in (range(0, 2), range(2, 4)):
            batch = torch.from_numpy(sampler.batch(warmup_step, micro_batch, warmup=True))
            (base(input_ids=batch, labels=batch).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), recipe.train.grad_clip)
        for name, p in base.named_parameters():
            m, v = expected[name]
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        base.zero_grad()
    state = optimizer_state(checkpoints / "step-00000000-warmup-00000004", tmp_path)
    assert state.keys() == expected.keys()
    for name, (m, v) in expected.items():
        assert float(state[name]["step"]) == 4 and state[name]["exp_avg"].abs().sum() > 0
        # to float noise of the tensor's scale: the loop's matmuls may run on other threads than this process's
        assert torch.allclose(state[name]["exp_avg"], m, rtol=1e-5, atol=1e-6 * m.abs().max().item())
        assert torch.allclose(state[name]["exp_avg_sq"], v, rtol=1e-5, atol=1e-6 * v.abs().max().item())


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_sigkill_during_the_optimizer_warmup_resumes_bitwise(tmp_path, tiny_model_dir):
    """Killed after the checkpoint of 2 of 5 warm-up steps, the rerun goes on from it: every
    logged step, of the warm-up's and of the schedule's, and the final weights are the
    uninterrupted run's (the warm-up ends between checkpoints)."""
    settings = dict(steps=6, checkpoint_every=2, optimizer_warmup_steps=5)
    reference_path, reference = prepare(tmp_path / "ref", tiny_model_dir, **settings)
    run_train(load_recipe(reference_path), reference)
    path, workdir = prepare(tmp_path / "killed", tiny_model_dir, **settings)
    kill_at_step(path, workdir, 2, counter="optimizer_warmup_step")
    staged = workdir / "train.tmp"
    complete = sorted(p.name for p in (staged / "checkpoints").glob("step-*") if (p / "_SUCCESS.json").exists())
    assert complete[-1].startswith("step-00000000-warmup-")  # killed during the warm-up
    assert any(m.get("optimizer_warmup_step", -1) >= int(complete[-1][-8:]) for m in metrics(workdir, "train.tmp"))
    run_train(load_recipe(path), workdir)

    def logged(run: Path) -> list[tuple]:
        fields = ("optimizer_warmup_step", "step", "loss", "grad_norm", "lr", "phase", "sources", "val_loss")
        return [tuple(m.get(field) for field in fields) for m in metrics(run)]

    assert logged(workdir) == logged(reference) and len(logged(reference)) == 5 + 6
    final, ref = (
        load_file(workdir / "train/final/model.safetensors"),
        load_file(reference / "train/final/model.safetensors"),
    )
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref)
