"""train: continued pretraining, launched with `accelerate launch` in its own process group.

`run_train` writes the job (resolved recipe, fingerprint, where the manifest and the shards
are) to `job.json` in the staging folder `<workdir>/train.tmp/`, starts `accelerate launch
-m refit.stages.train.loop <staging folder>` with the recipe's number of processes
(several CPU processes talk over gloo), and waits. Cancelling it (Ctrl-C, a Prefect
cancellation, any exception) terminates the whole process group. The finished run (weights,
checkpoints, metrics) is swapped into `<workdir>/train/` only when complete, so the previous
model stays until then. Rerunning the stage resumes from the latest complete checkpoint in
the staging folder; `force` starts over from the base model.

Before launching, it packs a fixed held-out set (`validation.arrow`: the first curated
validation documents of each source, train.validation_tokens in all) whose mean loss the
training processes compute at every checkpoint (`val_loss` in metrics.jsonl and the report).

With anneal ingredients (recipe section `soup`, #26), the training processes are launched once
per ingredient (loop.py): ingredient 0 is the single run, which also keeps its checkpoint where
the last phase starts (the branch point); each ingredient i >= 1 trains the last phase again
from that checkpoint in `ingredients/<i>/` (its own checkpoints, metrics and final/), in a data
order of its own. Every ingredient exports to `ingredients/<i>/final/`, and their average, the
soup (soup.py, uniform or greedy), becomes `final/`, with `soup.json` saying how it was made. A
rerun resumes the ingredient it was killed in, skips those finished, and averages again.

On several machines, one launcher runs on each (`python -m refit.flows.train_launcher RECIPE`,
e.g. under `srun` or torchrun, see deployments/train.sbatch), all on a shared workdir: machine 0
prepares the job and writes the stage's output, the others wait for its job and launch
their share of the processes.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict

from refit.stages.core import lifeline
from refit.stages.core.config import Recipe, TrainSpec
from refit.stages.core.contract import Stage
from refit.stages.core.disk import full_disk_line
from refit.stages.core.lock import held_locks, record_lock_holder
from refit.stages.core.markers import (
    is_done,
    read_marker,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.core.progress import Progress
from refit.stages.core.remote_code import check_loadable_config
from refit.stages.core.schedule import tokens_per_step
from refit.stages.core.shards import token_dtype, write_rows
from refit.stages.curate import stage as curate
from refit.stages.mix import stage as mix
from refit.stages.mix.manifest import load_manifest
from refit.stages.tokenize import stage as tokenize
from refit.stages.train.heartbeat import FOLDER as HEARTBEATS
from refit.stages.train.ingredients import (
    SoupUnplanned,
    branch_step,
    final_state,
    make_soup,
    soup_job,
    soup_report,
    to_train,
)
from refit.stages.train.layout import (
    FAILURE,
    FINAL_SHA256,
    FOLDER,
    INGREDIENTS,
    JOB,
    VALIDATION,
    TrainingError,
    ingredient_folders,
    scheduled,
    scheduled_metrics,
    training_folders,
)

log = logging.getLogger(__name__)


WORKER = "refit.stages.train.loop"  # the training process, one per device
POLL_SECONDS = 2.0  # how often the launcher reads the metrics log
PROGRESS_SECONDS = 10.0  # at most one progress line this often


class StopTraining(Exception):
    """Raised by an on_progress callback to stop the training processes (the pilot search
    prunes a trial); the checkpoints stay in the staging folder."""


@with_config(ConfigDict(extra="forbid"))
class TrainReport(TypedDict):
    stage: str
    seconds: float
    machine_rank: NotRequired[int]  # machines after the first report only this and the seconds
    steps: NotRequired[int]
    tokens: NotRequired[int]
    optimizer_warmup_steps: NotRequired[int]  # train.optimizer_warmup_steps, at LR 0 before the steps
    optimizer_warmup_tokens: NotRequired[int]  # the tokens they read: in the audit's cost, not in `tokens`
    switches: NotRequired[list[dict]]  # step, phase and LR of each LR-triggered switch
    first_loss: NotRequired[float]
    final_loss: NotRequired[float]
    validation: NotRequired[dict]  # the held-out rows and their loss at each checkpoint, or why off
    processes: NotRequired[int]
    machines: NotRequired[int]
    strategy: NotRequired[str]
    compiled: NotRequired[dict]  # train.compile: graphs and breaks of the main process
    final_model: NotRequired[str]
    # soup.ingredients > 1: each ingredient's {index, steps, tokens (its model's, the shared prefix's
    # included), anneal_tokens (trained for it alone), final_loss, val_loss}; `tokens` then counts the
    # shared prefix once and each ingredient's anneal once (as the audit's cost does)
    ingredients: NotRequired[list[dict]]
    soup: NotRequired[dict]  # final/soup.json: method, branch step, kept ingredients, losses


def read_metrics(workdir: Path) -> list[dict]:
    """The finished run's per-step log, one dict per step of the schedule (the optimizer
    warm-up's lines, flagged `optimizer_warmup_step`, left out)."""
    return scheduled_metrics(Path(workdir) / FOLDER)


def training_logs(workdir: Path) -> list[list[dict]]:
    """Every model's per-step log, as `read_metrics` gives the run's: the single run's; with a
    soup, each ingredient's by index, the shared prefix's steps leading those of ingredients 1.."""
    run = read_metrics(workdir)
    anneals = [scheduled_metrics(model.parent) for model in ingredient_models(workdir)[1:]]
    return [run, *([m for m in run if m["step"] < anneal[0]["step"]] + anneal for anneal in anneals if anneal)]


def read_report(workdir: Path) -> TrainReport:
    return json.loads((Path(workdir) / FOLDER / "report.json").read_text())


def final_model(workdir: Path) -> Path:
    """The finished run's model in Hugging Face format."""
    return Path(workdir) / FOLDER / "final"


def ingredient_models(workdir: Path) -> list[Path]:
    """The finished run's anneal ingredients in Hugging Face format, by index, which `final_model`
    averages; empty for a run without a soup (soup.ingredients 1)."""
    folder = Path(workdir) / FOLDER / INGREDIENTS
    found = [p for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return [p / "final" for p in sorted(found, key=lambda p: int(p.name))]


def final_model_sha256(workdir: Path) -> dict[str, str]:
    """sha256 of every file of the finished run's model, by name within `final_model`."""
    marker = read_marker(Path(workdir) / FOLDER) or {"outputs": {}}
    return {name[len("final/") :]: digest for name, digest in marker["outputs"].items() if name.startswith("final/")}


def run_fingerprint(workdir: Path) -> str | None:
    """The input fingerprint of the finished run: which training made the model, if any."""
    marker = read_marker(Path(workdir) / FOLDER)
    return marker["fingerprint"] if marker else None


def other_inputs(recipe: Recipe, workdir: Path) -> dict:
    """The base checkpoint's files with size and mtime: a changed base means a new run."""
    files = sorted(Path(recipe.base_model.path).iterdir())
    return {"base_files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Machines:
    """Where this launcher stands among the machines of the run."""

    count: int
    rank: int
    main_ip: str | None
    main_port: int | None


def resolve_machines(spec: TrainSpec, env: Mapping[str, str]) -> Machines:
    """The recipe's machine settings, each unset one read from the environment: torchrun
    (one launcher per machine: WORLD_SIZE launchers, GROUP_RANK, MASTER_ADDR), then Slurm
    (SLURM_NNODES, SLURM_NODEID, MASTER_ADDR and MASTER_PORT as deployments/train.sbatch
    exports them)."""
    torchrun = "TORCHELASTIC_RUN_ID" in env  # this launcher was started by torchrun, one per machine
    if torchrun:
        count, rank = int(env["WORLD_SIZE"]) // int(env.get("LOCAL_WORLD_SIZE", 1)), int(env["GROUP_RANK"])
    elif "SLURM_NNODES" in env:
        count, rank = int(env["SLURM_NNODES"]), int(env.get("SLURM_NODEID", 0))
    else:
        count, rank = 1, 0
    count = spec.num_machines if spec.num_machines is not None else count
    rank = spec.machine_rank if spec.machine_rank is not None else rank
    main_ip = spec.main_process_ip or env.get("MASTER_ADDR")
    if count > 1 and not main_ip:
        raise ValueError(
            f"train.main_process_ip: the recipe asks for {count} machines (train.num_machines) but gives no "
            f"address of machine 0 to reach it; set train.main_process_ip, or launch under torchrun or the "
            f"Slurm script in deployments/, which set MASTER_ADDR"
        )
    if rank >= count:
        raise ValueError(f"train.machine_rank: {rank} is not below the number of machines, {count}")
    if spec.num_processes % count:
        raise ValueError(
            f"train.num_processes: {spec.num_processes} processes cannot be split evenly over {count} machines"
        )
    port = spec.main_process_port
    if port is None and "MASTER_PORT" in env and not torchrun:  # under torchrun, its own store has that port
        port = int(env["MASTER_PORT"])
    if port is None and count > 1:  # every machine must agree on it: no free port picked per machine
        port = 29500
    return Machines(count, rank, main_ip if count > 1 else None, port)


def launch_command(
    num_processes: int, job_dir: Path, machines: Machines = Machines(1, 0, None, None), ingredient: int = 0
) -> list[str]:
    """`accelerate launch` of this machine's share of the num_processes training processes, to
    train `ingredient` of the job (0: the single run); the launcher dies with this process and
    the training processes with the launcher (lifeline.py). One process on one machine needs no
    launcher: it is started directly (a Python start with torch imported, 2-3 s, saved per
    run), with OMP_NUM_THREADS from `launch_env`."""
    if num_processes == 1 and machines.count == 1:
        return lifeline.command(WORKER, str(job_dir), str(ingredient))
    command = lifeline.command(
        "accelerate.commands.launch",
        "--num_machines",
        str(machines.count),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(num_processes),
    )
    if num_processes > 1:  # torchrun-style launch; on a machine without GPUs accelerate uses gloo
        command += ["--multi_gpu", "--main_process_port", str(machines.main_port or _free_port())]
    if machines.count > 1:
        command += ["--machine_rank", str(machines.rank), "--main_process_ip", machines.main_ip]
    command += ["--num_cpu_threads_per_process", str(_threads_per_process(num_processes, machines))]
    return command + ["-m", WORKER, str(job_dir), str(ingredient)]


def _threads_per_process(num_processes: int, machines: Machines) -> int:
    return max(1, (os.cpu_count() or 1) * machines.count // num_processes)


def launch_env(num_processes: int, machines: Machines) -> dict[str, str]:
    """The environment of `launch_command`: one CPU thread count for every process, as
    `accelerate launch` sets it for the processes it starts."""
    threads = str(_threads_per_process(num_processes, machines))
    # one checkpoint, one "Writing model shards" bar otherwise: the progress lines say enough
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **os.environ, "OMP_NUM_THREADS": threads}


# the process torchrun saw fail first, when a signal killed it (its ChildFailedError summary)
_KILLED = re.compile(
    r"Root Cause \(first observed failure\):\n\[\d+\]:\n\s*time\s*:[^\n]*\n\s*host\s*:\s*(?P<host>\S+)\n"
    r"\s*rank\s*:\s*(?P<rank>\d+)[^\n]*\n\s*exitcode\s*:\s*-\d+ \(pid: (?P<pid>\d+)\)\s*\((?P<signal>\w+)\)"
)


def _relay(stream, tail: collections.deque) -> None:
    """Pass the launcher's stderr through, keeping its end for the failure summary."""
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        tail.append(text)


def failure_reason(train_dir: Path, launcher_log: str, code: int) -> str:
    """Why the training processes stopped: any that died from a signal (named by torchrun, which
    then stopped the others) and what the failing processes recorded themselves."""
    killed = {
        m["rank"]: f"training process rank {m['rank']} (pid {m['pid']} on {m['host']}) was killed by "
        f"{m['signal']}, and the others were stopped"
        for m in _KILLED.finditer(launcher_log)
    }
    if code < 0:  # the training process itself, started without a launcher (one process)
        killed[0] = f"the training process was killed by {signal.Signals(-code).name}"
    failure = train_dir / FAILURE
    recorded = [failure.read_text().strip()] if failure.is_file() else []
    if killed or recorded:
        return "; ".join([*killed.values(), *recorded])
    full = full_disk_line(launcher_log)  # a full disk kept the failing process from recording why
    return f"exit code {code}" + (f": {full}" if full else "") + "; see the log above"


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def write_validation_set(recipe: Recipe, workdir: Path, out: Path) -> dict:
    """Pack the first curated validation documents of each source, in order, into rows of
    tokenize.seq_len (documents joined by EOS, as tokenize packs training data), with
    train.validation_tokens shared out equally between the sources that have some, and write
    them to out atomically in the shard format. Returns the report's account of it: rows and
    documents per source, the sources without validation documents, or why there is none."""
    out.unlink(missing_ok=True)
    if not recipe.train.validation_tokens:
        return {"off": "train.validation_tokens is 0"}
    held = {source.name: curate.validation_count(workdir, source.name) for source in recipe.sources}
    without = [name for name, count in held.items() if not count]
    present = [name for name, count in held.items() if count]
    if not present:
        return {"off": "no source has validation documents (curate held none out)"}
    tokenizer = tokenize.load_tokenizer(tokenize.tokenizer_dir(recipe))
    seq_len = recipe.tokenize.seq_len
    rows_in_all = recipe.train.validation_tokens // seq_len
    pieces, sources = [], {}
    for i, name in enumerate(present):
        wanted = (rows_in_all // len(present) + (i < rows_in_all % len(present))) * seq_len
        stream: list[int] = []
        docs = 0
        for text in curate.iter_validation_texts(workdir, name):  # only the first documents are read
            if len(stream) >= wanted:
                break
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            docs += 1
        rows = min(wanted, len(stream)) // seq_len
        pieces.append(np.asarray(stream[: rows * seq_len], dtype=np.int64))
        sources[name] = {"docs": docs, "held_out_docs": held[name], "rows": rows}
    flat = np.concatenate(pieces)
    if not len(flat):
        return {"off": f"the validation documents fill no row of {seq_len} tokens", "sources": sources}
    write_rows(out, flat, seq_len, token_dtype(len(tokenizer)), {"seq_len": str(seq_len)})
    return {"rows": len(flat) // seq_len, "tokens": len(flat), "sources": sources, "sources_without_documents": without}


def _wait(
    process: subprocess.Popen,
    metrics: Path,
    total_steps: int,
    on_progress: Callable[[dict], None] | None,
    ingredient: int | None = None,
) -> int:
    """Wait for the training processes, logging a progress line with an ETA every few seconds
    and passing the newest metrics line of a scheduled step to on_progress (with the ingredient
    it trains, `ingredient`, when the run makes a soup). A progress report that fails (a
    half-written line, an unreachable UI) never stops training."""
    label = "train" if ingredient is None else f"train ingredient {ingredient}"
    progress = Progress(label, total_steps, "steps", log, every=PROGRESS_SECONDS)
    offset = 0
    while True:
        code = process.poll()
        if metrics.is_file():
            if metrics.stat().st_size < offset:  # a resumed run rewrote the log up to its checkpoint
                offset = 0
            with open(metrics, "rb") as handle:
                handle.seek(offset)
                lines = handle.read().splitlines(keepends=True)
            complete = [line for line in lines if line.endswith(b"\n")]  # the writer may be mid-line
            offset += sum(len(line) for line in complete)
            try:
                if steps := [line for line in map(json.loads, complete) if scheduled(line)]:
                    line = steps[-1]
                    progress.update(
                        line["step"] + 1, f"loss {line['loss']:.3f} lr {line['lr']:.2e} phase {line['phase']}"
                    )
                    if on_progress is not None:
                        on_progress(line if ingredient is None else {**line, "ingredient": ingredient})
            except StopTraining:
                raise
            except Exception as error:  # progress is best effort; training is not
                log.warning("train: progress report failed: %s", error)
        if code is not None:
            return code
        try:  # returns as soon as the launcher exits, not at the next poll
            process.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass


def run_train(
    recipe: Recipe, workdir: Path, force: bool = False, on_progress: Callable[[dict], None] | None = None
) -> TrainReport:
    """Train from the manifest; returns the report (also `train/report.json`). on_progress
    receives the latest metrics line of a scheduled step (step, loss, lr, phase, ...) every few
    seconds. On a machine other than 0, launches its processes on machine 0's job and returns
    once they end."""
    workdir = Path(workdir)
    final = workdir / FOLDER
    machines = resolve_machines(recipe.train, os.environ)
    expected = STAGE.input_fingerprint(recipe, workdir)
    if not force and is_done(final, expected):
        return read_report(workdir)
    check_loadable_config(Path(recipe.base_model.path), recipe.base_model.trust_remote_code)  # before any launch
    ingredients = recipe.soup.ingredients
    if machines.rank > 0:  # machine 0 stages the run and swaps it into place
        job_dir = final.with_name(final.name + ".tmp")
        _wait_for_job(job_dir / JOB, expected)
        started = time.time()
        for ingredient in to_train(job_dir, ingredients):  # as machine 0 launches them, in turn
            _run_processes(recipe, job_dir, on_progress, machines, ingredient)
        return {"stage": "train", "machine_rank": machines.rank, "seconds": round(time.time() - started, 2)}

    log.info("train: %.1f MB of shards match the manifest's sha256", mix.verify_shards(workdir) / 1e6)
    branch = branch_step(recipe, mix.read_manifest(workdir))

    def same_run(staging: Path) -> bool:  # another run's checkpoints are never resumed
        job = staging / JOB
        return not force and job.is_file() and json.loads(job.read_text())["fingerprint"] == expected

    with staged_output(final, reuse=same_run) as job_dir:
        for folder in training_folders(job_dir):
            for unfinished in (folder / "checkpoints").glob("*.tmp"):  # staged by a killed run
                shutil.rmtree(unfinished)
            shutil.rmtree(folder / HEARTBEATS, ignore_errors=True)  # the last launch's processes
        (job_dir / FAILURE).unlink(missing_ok=True)
        job = {
            "fingerprint": expected,
            "recipe": recipe.model_dump(mode="json"),
            "manifest": str(mix.manifest_path(workdir).resolve()),
            "data_root": str(workdir.resolve()),  # manifest shard paths are relative to it
            "failure": FAILURE,
            "final_sha256": FINAL_SHA256,
            "soup": soup_job(recipe, expected, branch, job_dir),
        }
        held_out = write_validation_set(recipe, workdir, job_dir / VALIDATION)
        job["validation"] = None if "off" in held_out else VALIDATION
        job["validation_set"] = held_out
        _log_validation_set(held_out)
        if recipe.soup.method == "greedy" and ingredients > 1 and "off" in held_out:
            raise SoupUnplanned(
                f"soup.method: greedy keeps an ingredient only if the held-out loss drops, but there are no "
                f"held-out rows ({held_out['off']}): use method uniform, or hold validation documents out"
            )
        write_json_atomic(job_dir / JOB, job)
        started = time.time()
        for ingredient in to_train(job_dir, ingredients):
            _run_processes(recipe, job_dir, on_progress, machines, ingredient)
        if ingredients > 1:
            make_soup(recipe, job_dir)
        report = {**_report(recipe, job_dir, machines, started), "final_model": str(final_model(workdir))}
        write_json_atomic(job_dir / "report.json", report)
        for folder in training_folders(job_dir):
            shutil.rmtree(folder / HEARTBEATS, ignore_errors=True)  # the processes have ended
        write_marker(
            job_dir, "train", expected, started, STAGE.code_version, known_sha256=_hashed_when_written(job_dir)
        )
    return read_report(workdir)


def _log_validation_set(held_out: dict) -> None:
    if "off" in held_out:
        log.warning("train: no validation loss at checkpoints: %s", held_out["off"])
        return
    log.info(
        "train: validation loss at every checkpoint on %d rows (%d tokens) of %s",
        held_out["rows"],
        held_out["tokens"],
        ", ".join(f"{name}: {s['rows']}" for name, s in held_out["sources"].items()),
    )
    if held_out["sources_without_documents"]:
        log.warning(
            "train: no validation documents for %s: the validation loss leaves them out",
            ", ".join(held_out["sources_without_documents"]),
        )


def _validation_report(job_dir: Path, metrics: list[dict]) -> dict:
    """What was held out and its loss at each checkpoint (after that many optimizer steps)."""
    held_out = json.loads((job_dir / JOB).read_text())["validation_set"]
    if "off" in held_out:
        return held_out
    scored = [m for m in metrics if "val_loss" in m]
    return {
        **held_out,
        "losses": [{"checkpoint": m["step"] + 1, "val_loss": m["val_loss"]} for m in scored],
        "seconds_per_pass": round(sum(m["val_seconds"] for m in scored) / len(scored), 3) if scored else None,
    }


def _total_steps(job_dir: Path) -> int:
    """Steps of the run the job in job_dir trains, from its manifest."""
    return load_manifest(Path(json.loads((job_dir / JOB).read_text())["manifest"])).total_steps


def _run_processes(
    recipe: Recipe,
    job_dir: Path,
    on_progress: Callable[[dict], None] | None,
    machines: Machines,
    ingredient: int = 0,
) -> None:
    """Run this machine's training processes on the job in job_dir, training one of its
    ingredients (0: the single run), until they finish."""
    ingredients = recipe.soup.ingredients
    train_dir = ingredient_folders(job_dir, ingredients, ingredient)[0]
    if ingredients > 1:
        log.info("train: ingredient %d (of ingredients 0-%d) in %s", ingredient, ingredients - 1, train_dir)
    command = launch_command(recipe.train.num_processes, job_dir, machines, ingredient)
    log.info("train: %s", " ".join(command))
    env = launch_env(recipe.train.num_processes, machines)
    if recipe.train.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, recipe.train.devices))
    # the launcher holds the workdir lock too, and is named as a holder: until it has died with
    # this process, no other run can start on the workdir while training processes write to it
    process = subprocess.Popen(command, start_new_session=True, env=env, pass_fds=held_locks(), stderr=subprocess.PIPE)
    record_lock_holder(process.pid)
    launcher_log: collections.deque[str] = collections.deque(maxlen=500)
    relay = threading.Thread(target=_relay, args=(process.stderr, launcher_log), daemon=True)
    relay.start()
    try:
        souping = ingredient if ingredients > 1 else None
        code = _wait(process, train_dir / "metrics.jsonl", _total_steps(job_dir), on_progress, souping)
    except BaseException:
        _stop(process)
        raise
    relay.join(timeout=10)
    if code != 0:
        reason = failure_reason(job_dir, "".join(launcher_log), code)
        which = f" (ingredient {ingredient})" if ingredients > 1 else ""
        raise TrainingError(
            f"training failed{which}: {reason}. Rerunning the stage resumes from the latest complete "
            f"checkpoint in {train_dir / 'checkpoints'}"
        )


def _report(recipe: Recipe, job_dir: Path, machines: Machines, started: float) -> dict:
    ingredients = recipe.soup.ingredients
    state = final_state(job_dir, ingredients, 0)
    metrics = scheduled_metrics(job_dir)
    report = {
        "stage": "train",
        "steps": state["step"],
        "tokens": state["tokens"],
        "optimizer_warmup_steps": state["optimizer_warmup_steps"],
        "optimizer_warmup_tokens": state["optimizer_warmup_steps"] * tokens_per_step(recipe),
        "switches": state["switches"],
        "final_loss": metrics[-1]["loss"],
        "first_loss": metrics[0]["loss"],
        "validation": _validation_report(job_dir, metrics),
        "processes": recipe.train.num_processes,
        "machines": machines.count,
        "strategy": recipe.train.strategy,
        "seconds": round(time.time() - started, 2),
        **({"compiled": state["compiled"]} if "compiled" in state else {}),  # train.compile: main process, last launch
    }
    return report if ingredients == 1 else {**report, **soup_report(recipe, job_dir)}


def _hashed_when_written(train_dir: Path) -> dict[str, str]:
    """sha256 of the checkpoints' and the exports' files (the single run's or the soup's, and
    each ingredient's), as their writers recorded them: the stage's marker does not read those
    bytes again."""
    known = {}
    for folder in training_folders(train_dir):
        prefix = folder.relative_to(train_dir)
        for checkpoint in (folder / "checkpoints").glob("step-*"):
            marker = read_marker(checkpoint) or {}
            outputs = marker.get("outputs", {})
            known.update({(prefix / "checkpoints" / checkpoint.name / n).as_posix(): d for n, d in outputs.items()})
        if (folder / FINAL_SHA256).is_file():
            exported = json.loads((folder / FINAL_SHA256).read_text())
            known.update({(prefix / "final" / name).as_posix(): digest for name, digest in exported.items()})
    return known


def _wait_for_job(job_file: Path, expected: str, timeout: float = 600.0, every: float = 1.0) -> None:
    """A machine other than 0 starts once machine 0 has prepared this run's job."""
    deadline = time.time() + timeout
    while not (job_file.is_file() and json.loads(job_file.read_text())["fingerprint"] == expected):
        if time.time() > deadline:
            raise TrainingError(
                f"machine 0 has not prepared this run in {job_file.parent} after {timeout:.0f} s: is it running "
                f"the same recipe on the same (shared) workdir?"
            )
        time.sleep(every)


STAGE = Stage(
    name="train",
    reads=(curate.STAGE, tokenize.STAGE, mix.STAGE),  # tokenize: the held-out rows are packed as it packs
    recipe_reads=("base_model", "train", "soup", "schedule.max_lr", "tokenize.seq_len", "tokenizer", "sources.name"),
    folder=FOLDER,
    report=TrainReport,
    run_function=run_train,
    other_inputs=other_inputs,
    run_only=("on_progress",),
)
