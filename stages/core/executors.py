"""Run a sequence of datatrove steps on the executor the recipe chose (curate.executor):
datatrove's LocalPipelineExecutor, RayPipelineExecutor or SlurmPipelineExecutor.

Each step is a list of module-scope PipelineSteps run as `tasks` datatrove tasks; a step
starts once every task of the one before it has finished. Whatever the executor, a step
whose tasks did not all complete fails the run, naming its log folder.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor

from refit.stages.core.config import CurateSpec, RaySpec
from refit.stages.core.lifeline import forked_workers_follow_parent

log = logging.getLogger(__name__)


class ExecutorError(RuntimeError):
    """A datatrove step did not complete on its executor."""


@dataclass(frozen=True)
class Step:
    name: str
    pipeline: list
    tasks: int


def build_executors(steps: list[Step], spec: CurateSpec, logs: Path) -> list[PipelineExecutor]:
    """One datatrove executor per step, logging under logs/<step name>. Slurm executors depend
    on the one before, so submitting the last submits them all, chained by afterok."""
    executors: list[PipelineExecutor] = []
    for step in steps:
        folder = str(logs / step.name)
        if spec.executor == "local":
            executor = LocalPipelineExecutor(
                pipeline=step.pipeline,
                tasks=step.tasks,
                workers=min(spec.workers, step.tasks),
                logging_dir=folder,
                skip_completed=False,
                # fork, not datatrove's default forkserver: workers start without re-importing
                # datatrove and spaCy, which costs more than the work itself on small batches
                start_method="fork",
            )
        elif spec.executor == "ray":
            ray = spec.ray or RaySpec()
            executor = RayPipelineExecutor(
                pipeline=step.pipeline,
                tasks=step.tasks,
                workers=spec.workers,
                logging_dir=folder,
                skip_completed=False,
                cpus_per_task=ray.cpus_per_task,
                mem_per_cpu_gb=ray.mem_per_cpu_gb,
            )
        else:
            slurm = spec.slurm
            executor = SlurmPipelineExecutor(
                pipeline=step.pipeline,
                tasks=step.tasks,
                workers=spec.workers,
                time=slurm.time,
                partition=slurm.partition,
                cpus_per_task=slurm.cpus_per_task,
                mem_per_cpu_gb=slurm.mem_per_cpu_gb,
                qos=slurm.qos,
                env_command=slurm.env_command,
                venv_path=None if slurm.env_command else str(Path(sys.prefix) / "bin" / "activate"),
                sbatch_args=dict(slurm.sbatch_args),
                job_name=f"refit-{step.name}",  # curate's steps, and tokenize
                logging_dir=folder,
                depends=executors[-1] if executors else None,
                mail_type="NONE",
            )
        executors.append(executor)
    return executors


def run_steps(steps: list[Step], spec: CurateSpec, logs: Path) -> None:
    """Run the steps in order on curate.executor and wait until the last has finished."""
    executors = build_executors(steps, spec, logs)
    if spec.executor == "slurm":
        executors[-1].run()  # submits every step's job array, each after the one before
        _wait_for_slurm(executors, spec.slurm.poll_seconds)
    else:
        # local: datatrove's pool and manager must die with this process and obey SIGTERM (lifeline.py)
        with forked_workers_follow_parent() if spec.executor == "local" else _ray_cluster(spec.ray or RaySpec(), spec):
            for executor in executors:
                executor.run()
                _check_complete(executor)


def _check_complete(executor: PipelineExecutor) -> None:
    incomplete = executor.get_incomplete_ranks(skip_completed=True)
    if incomplete:
        raise ExecutorError(
            f"{len(incomplete)} of {executor.world_size} datatrove tasks did not complete "
            f"(ranks {incomplete[:5]}...); their logs are in {executor.logging_dir.path}/logs"
        )


@contextmanager
def executor_session(spec: CurateSpec) -> Iterator[None]:
    """Around several `run_steps` calls: on executor ray, one connection (or one private local
    cluster, started once) for all of them; nothing otherwise."""
    if spec.executor != "ray":
        yield
        return
    with _ray_cluster(spec.ray or RaySpec(), spec):
        yield


@contextmanager
def _ray_cluster(ray_spec: RaySpec, spec: CurateSpec) -> Iterator[None]:
    """Connect to the recipe's Ray cluster, or start a private local one for the run; only a
    cluster started or connected to here is shut down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    if ray_spec.address is None:
        ray.init(num_cpus=spec.workers * ray_spec.cpus_per_task, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=ray_spec.address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _wait_for_slurm(executors: list[PipelineExecutor], poll_seconds: int) -> None:
    """Until every task of the last step has completed; fails when none of the jobs is queued
    or running any more while tasks are still missing (a job failed or was cancelled)."""
    last = executors[-1]
    jobs = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
    while last.get_incomplete_ranks(skip_completed=True):
        queued = subprocess.run(
            ["squeue", "--noheader", "--format=%i", "--jobs", ",".join(jobs)], capture_output=True, text=True
        ).stdout.split()
        if not queued and last.get_incomplete_ranks(skip_completed=True):
            for executor in executors:
                _check_complete(executor)
        log.info("curate: waiting for Slurm jobs %s", ", ".join(queued))
        time.sleep(poll_seconds)
