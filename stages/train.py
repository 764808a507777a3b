"""train: continued pretraining, launched with `accelerate launch` in its own process group.

`run_train` writes the job (resolved recipe and fingerprint) to `<workdir>/train/job.json`,
starts `accelerate launch -m refit.stages.lib.train_loop` with the recipe's number of processes
(several CPU processes talk over gloo), and waits. Cancelling it (Ctrl-C, a Prefect
cancellation, any exception) terminates the whole process group. Rerunning the stage
resumes from the latest complete checkpoint; `force` starts over from the base model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from refit.stages.lib.config import Recipe
from refit.stages.lib.lock import held_locks
from refit.stages.lib.markers import fingerprint, is_done, upstream_fingerprint, write_json_atomic, write_marker

log = logging.getLogger(__name__)


FAILURE = "failure.txt"  # why the training processes stopped, written by a failing rank


class TrainingError(RuntimeError):
    """The training processes failed; the latest complete checkpoint is kept."""


def read_metrics(train_dir: Path) -> list[dict]:
    """The per-step log, one dict per optimizer step."""
    return [json.loads(line) for line in (Path(train_dir) / "metrics.jsonl").read_text().splitlines()]


def base_model_listing(path: Path) -> list[tuple[str, int, int]]:
    """The base checkpoint's files with size and mtime: a changed base means a new run."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).iterdir()) if p.is_file()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(num_processes: int, workdir: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(num_processes),
    ]
    if num_processes > 1:  # torchrun-style launch; on a machine without GPUs accelerate uses gloo
        command += ["--multi_gpu", "--main_process_port", str(_free_port())]
    cores = os.cpu_count() or 1
    command += ["--num_cpu_threads_per_process", str(max(1, cores // num_processes))]
    return command + ["-m", "refit.stages.lib.train_loop", str(workdir)]


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
    return fingerprint("train", sections, [upstream_fingerprint(workdir, "mix", "train")])


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
    train_dir = workdir / "train"
    expected = input_fingerprint(recipe, workdir)
    if not force and is_done(train_dir, expected):
        return json.loads((train_dir / "report.json").read_text())
    job_file = train_dir / "job.json"
    previous = json.loads(job_file.read_text())["fingerprint"] if job_file.is_file() else None
    if force or previous != expected:  # another run's checkpoints are never resumed
        shutil.rmtree(train_dir, ignore_errors=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "_SUCCESS.json").unlink(missing_ok=True)
    (train_dir / FAILURE).unlink(missing_ok=True)
    write_json_atomic(job_file, {"fingerprint": expected, "recipe": recipe.model_dump(mode="json")})
    started = time.time()
    command = launch_command(recipe.train.num_processes, workdir)
    log.info("train: %s", " ".join(command))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
    )
    if recipe.train.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, recipe.train.devices))
    # the launcher holds the workdir lock too: if this process is killed, no other run can
    # start on the workdir while the orphaned training processes still write to it
    process = subprocess.Popen(command, start_new_session=True, env=env, pass_fds=held_locks())
    try:
        code = _wait(process, train_dir / "metrics.jsonl", on_progress)
    except BaseException:
        _stop(process)
        raise
    if code != 0:
        failure = train_dir / FAILURE
        reason = failure.read_text().strip() if failure.is_file() else f"exit code {code}; see the log above"
        raise TrainingError(
            f"training failed: {reason}. Rerunning the stage resumes from the latest complete "
            f"checkpoint in {train_dir / 'checkpoints'}"
        )
    state = json.loads((train_dir / "final" / "trainer_state.json").read_text())
    metrics = read_metrics(train_dir)
    report = {
        "stage": "train",
        "steps": state["step"],
        "tokens": state["tokens"],
        "switches": state["switches"],
        "spikes": state["spikes"],
        "final_loss": metrics[-1]["loss"],
        "first_loss": metrics[0]["loss"],
        "processes": recipe.train.num_processes,
        "seconds": round(time.time() - started, 2),
        "final_model": str(train_dir / "final"),
    }
    write_json_atomic(train_dir / "report.json", report)
    write_marker(train_dir, "train", expected, started)
    return report
