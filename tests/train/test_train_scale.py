"""train at scale: FSDP matches DDP, resumes bitwise and on another number of processes; two
machines on loopback and through torchrun's rendezvous match one; a dead or silent process is
named; out of memory says what to change; the export is streamed; activation checkpointing
and compile keep the losses; docs/scaling-out.md's commands parse."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    HELD_OUT,
    REPO,
    final_model_loss,
    free_port,
    kill_at_step,
    metrics,
    prepare,
    train_variant,
    training_processes,
    validation_losses,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from refit.stages.core.config import load_recipe
from refit.stages.core.markers import file_sha256, read_marker
from refit.stages.train.stage import (
    Machines,
    launch_command,
    read_report,
    resolve_machines,
    run_train,
)

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)  # GPT-2 trains in test_architectures.py
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
    # per tensor, not per element: Adam turns a rounding difference in a near-zero gradient into
    # a whole step of lr for that element (1.3e-5 seen), while a resume that lost or reset any
    # state moves every element of the tensor by that much
    for name in theirs:
        assert torch.dist(ours[name], theirs[name]) <= 1e-4 * theirs[name].norm(), name


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
    assert args.num_processes == 16 and args.multi_gpu and args.training_script == "refit.stages.train.loop"


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
    from refit.stages.train.heartbeat import Heartbeat

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
    from refit.stages.train.loop import out_of_memory

    path, _ = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity")
    message = str(out_of_memory(error, "step 7", load_recipe(path)))
    assert message.startswith("out of GPU memory at step 7: asked for 2.50 GiB")
    for hint in ("train.micro_batch_size (now 2)", "train.activation_checkpointing: true", "train.strategy: fsdp"):
        assert hint in message


def test_export_is_streamed_as_sharded_safetensors_that_transformers_loads(tmp_path, tiny_model_dir):
    from refit.stages.train.loop import export_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    digests = export_weights(model, tmp_path, shard_bytes=20_000)  # a few tensors per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(digests) == len(set(index["weight_map"].values())) > 2
    assert all(digests[name] == file_sha256(tmp_path / name) for name in digests)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def scaling_out_commands() -> list[list[str]]:
    """The shell commands of docs/scaling-out.md (its ```bash blocks), continuation lines joined."""
    import re

    text = (REPO / "docs" / "scaling-out.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(" #")[0]) for line in lines if line.strip()]


def test_the_scaling_out_commands_parse_as_written():
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
    """docs/scaling-out.md's torchrun command on two "machines" (loopback): torchrun's c10d rendezvous
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
    from refit.stages.train.loop import decoder_layers, prepare_model

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


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)  # GPT-2 trains in test_architectures.py
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

    from refit.stages.train.loop import compile_summary

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
