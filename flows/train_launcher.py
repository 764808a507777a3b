"""One machine's launcher of the train stage, for runs on several machines.

    python -m refit.flows.train_launcher RECIPE [--workdir DIR] [--force]

runs on every machine of the run (started by srun, see deployments/train.sbatch, or by
torchrun with one process per machine): each resolves the recipe's base as `refit run` does
and calls the train stage, which reads the machine's rank from the recipe or the
environment. Machine 0 holds the workdir lock and writes the stage's output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from refit.flows.continuation import continue_from
from refit.stages.core.config import load_recipe
from refit.stages.core.lock import workdir_lock
from refit.stages.train.stage import resolve_machines, run_train

log = logging.getLogger(__name__)


def launcher_parser():
    parser = argparse.ArgumentParser(prog="python -m refit.flows.train_launcher", description=main.__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--workdir", default=None, help="default: the recipe's workdir")
    parser.add_argument("--force", action="store_true", help="start over from the base model (machine 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """One machine's launcher: `python -m refit.flows.train_launcher RECIPE [--workdir DIR] [--force]`,
    run on every machine of a multi-machine run (by srun, or by torchrun with one process per
    machine). Machine 0 holds the workdir lock, as `refit stage train` does."""
    args = launcher_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = load_recipe(args.recipe)
    workdir = Path(args.workdir or recipe.workdir)
    main_machine = resolve_machines(recipe.train, os.environ).rank == 0
    with workdir_lock(workdir, f"train {args.recipe}") if main_machine else contextlib.nullcontext():
        recipe, why = continue_from(recipe, workdir)  # the same base as `refit run` picks, on every machine
        log.info(why)
        report = run_train(recipe, workdir, force=args.force)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
