"""train: continued pretraining, launched with `accelerate launch` in its own process group.

`run_train` writes the job (resolved recipe, fingerprint, where the manifest and the shards
are) to `job.json` in the staging folder `<workdir>/train.tmp/`, starts `accelerate launch
-m refit.stages.lib.train_loop <staging folder>` with the recipe's number of processes
(several CPU processes talk over gloo), and waits. Cancelling it (Ctrl-C, a Prefect
cancellation, any exception) terminates the whole process group. The finished run (weights,
checkpoints, metrics) is swapped into `<workdir>/train/` only when complete, so the previous
model stays until then. Rerunning the stage resumes from the latest complete checkpoint in
the staging folder; `force` starts over from the base model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from refit.stages import mix
from refit.stages.lib import lifeline
from refit.stages.lib.config import Recipe
from refit.stages.lib.contract import Stage
from refit.stages.lib.lock import held_locks, record_lock_holder
from refit.stages.lib.markers import (
    code_version,
    fingerprint,
    is_done,
    read_marker,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.lib.remote_code import check_loadable_config

log = logging.getLogger(__name__)


FOLDER = "train"
WORKER = "refit.stages.lib.train_loop"  # the training process, one per device
JOB = "job.json"
FAILURE = "failure.txt"  # why the training processes stopped, written by a failing rank


class TrainingError(RuntimeError):
    """The training processes failed; the latest complete checkpoint is kept."""


def _metrics(train_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(train_dir) / "metrics.jsonl").read_text().splitlines()]


def read_metrics(workdir: Path) -> list[dict]:
    """The finished run's per-step log, one dict per optimizer step."""
    return _metrics(Path(workdir) / FOLDER)


def read_report(workdir: Path) -> dict:
    return json.loads((Path(workdir) / FOLDER / "report.json").read_text())


def final_model(workdir: Path) -> Path:
    """The finished run's model in Hugging Face format."""
    return Path(workdir) / FOLDER / "final"


def final_model_sha256(workdir: Path) -> dict[str, str]:
    """sha256 of every file of the finished run's model, by name within `final_model`."""
    marker = read_marker(Path(workdir) / FOLDER) or {"outputs": {}}
    return {name[len("final/") :]: digest for name, digest in marker["outputs"].items() if name.startswith("final/")}


def run_fingerprint(workdir: Path) -> str | None:
    """The input fingerprint of the finished run: which training made the model, if any."""
    marker = read_marker(Path(workdir) / FOLDER)
    return marker["fingerprint"] if marker else None


def base_model_listing(path: Path) -> list[tuple[str, int, int]]:
    """The base checkpoint's files with size and mtime: a changed base means a new run."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).iterdir()) if p.is_file()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(num_processes: int, job_dir: Path) -> list[str]:
    # the launcher dies with this process and the training processes with the launcher (lifeline.py)
    command = lifeline.command(
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(num_processes),
    )
    if num_processes > 1:  # torchrun-style launch; on a machine without GPUs accelerate uses gloo
        command += ["--multi_gpu", "--main_process_port", str(_free_port())]
    cores = os.cpu_count() or 1
    command += ["--num_cpu_threads_per_process", str(max(1, cores // num_processes))]
    return command + ["-m", WORKER, str(job_dir)]


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


def input_fingerprint(recipe: Recipe, workdir: Path) -> str:
    sections = {
        "train": recipe.train.model_dump(mode="json", exclude={"devices"}),  # where it runs is not what it makes
        "base_model": recipe.base_model.model_dump(mode="json"),
        "base_files": base_model_listing(Path(recipe.base_model.path)),
    }
    return fingerprint("train", sections, [mix.STAGE.produced(workdir, "train")], code_version(__name__))


def _wait(
    process: subprocess.Popen, metrics: Path, on_progress: Callable[[dict], None] | None, every: float = 2.0
) -> int:
    """Wait for the training processes, passing the newest metrics line to on_progress. A
    progress report that fails (a half-written line, an unreachable UI) never stops training."""
    offset = 0
    while True:
        code = process.poll()
        if on_progress is not None and metrics.is_file():
            if metrics.stat().st_size < offset:  # a resumed run rewrote the log up to its checkpoint
                offset = 0
            with open(metrics, "rb") as handle:
                handle.seek(offset)
                lines = handle.read().splitlines(keepends=True)
            complete = [line for line in lines if line.endswith(b"\n")]  # the writer may be mid-line
            offset += sum(len(line) for line in complete)
            try:
                if complete:
                    on_progress(json.loads(complete[-1]))
            except Exception as error:  # progress is best effort; training is not
                log.warning("train: progress report failed: %s", error)
        if code is not None:
            return code
        time.sleep(every)


def run_train(
    recipe: Recipe, workdir: Path, force: bool = False, on_progress: Callable[[dict], None] | None = None
) -> dict:
    """Train from the manifest; returns the report (also `train/report.json`). on_progress
    receives the latest metrics line (step, loss, lr, phase, ...) every few seconds."""
    workdir = Path(workdir)
    final = workdir / FOLDER
    expected = input_fingerprint(recipe, workdir)
    if not force and is_done(final, expected):
        return read_report(workdir)
    check_loadable_config(Path(recipe.base_model.path), recipe.base_model.trust_remote_code)  # before any launch

    def same_run(staging: Path) -> bool:  # another run's checkpoints are never resumed
        job = staging / JOB
        return not force and job.is_file() and json.loads(job.read_text())["fingerprint"] == expected

    with staged_output(final, reuse=same_run) as job_dir:
        (job_dir / FAILURE).unlink(missing_ok=True)
        job = {
            "fingerprint": expected,
            "recipe": recipe.model_dump(mode="json"),
            "manifest": str(mix.manifest_path(workdir).resolve()),
            "data_root": str(workdir.resolve()),  # manifest shard paths are relative to it
            "failure": FAILURE,
        }
        write_json_atomic(job_dir / JOB, job)
        started = time.time()
        report = {**_launch(recipe, job_dir, on_progress), "final_model": str(final_model(workdir))}
        write_json_atomic(job_dir / "report.json", report)
        write_marker(job_dir, "train", expected, started, code_version(__name__))
    return read_report(workdir)


def _launch(recipe: Recipe, job_dir: Path, on_progress: Callable[[dict], None] | None) -> dict:
    """Run the training processes on the job in job_dir until they finish; their report."""
    started = time.time()
    command = launch_command(recipe.train.num_processes, job_dir)
    log.info("train: %s", " ".join(command))
    env = dict(os.environ)
    if recipe.train.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, recipe.train.devices))
    # the launcher holds the workdir lock too, and is named as a holder: until it has died with
    # this process, no other run can start on the workdir while training processes write to it
    process = subprocess.Popen(command, start_new_session=True, env=env, pass_fds=held_locks())
    record_lock_holder(process.pid)
    try:
        code = _wait(process, job_dir / "metrics.jsonl", on_progress)
    except BaseException:
        _stop(process)
        raise
    if code != 0:
        failure = job_dir / FAILURE
        reason = failure.read_text().strip() if failure.is_file() else f"exit code {code}; see the log above"
        raise TrainingError(
            f"training failed: {reason}. Rerunning the stage resumes from the latest complete "
            f"checkpoint in {job_dir / 'checkpoints'}"
        )
    state = json.loads((job_dir / "final" / "trainer_state.json").read_text())
    metrics = _metrics(job_dir)
    return {
        "stage": "train",
        "steps": state["step"],
        "tokens": state["tokens"],
        "switches": state["switches"],
        "spikes": state["spikes"],
        "final_loss": metrics[-1]["loss"],
        "first_loss": metrics[0]["loss"],
        "processes": recipe.train.num_processes,
        "seconds": round(time.time() - started, 2),
    }


STAGE = Stage(
    name="train",
    reads=("mix",),
    sections=("base_model", "train"),
    folder=FOLDER,
    run_function=run_train,
    fingerprint_function=input_fingerprint,
    takes=("on_progress",),
)
