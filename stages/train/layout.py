"""The train stage's folder: what lies where, read by the stage (stage.py), its soup
(ingredients.py) and, through the job, the training processes (loop.py).

    train/ (train.tmp/ while staged)  job.json, validation.arrow, failure.txt, metrics.jsonl,
                                      checkpoints/, final/ and final_sha256.json
    train/ingredients/<i>/            with a soup (recipe section `soup`): ingredient i's
                                      checkpoints/, metrics.jsonl (i >= 1) and final/
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = "train"
JOB = "job.json"
FAILURE = "failure.txt"  # why the training processes stopped, written by a failing rank
FINAL_SHA256 = "final_sha256.json"  # sha256 of the exported weights, hashed as they were written
VALIDATION = "validation.arrow"  # the held-out rows the training processes score at every checkpoint
INGREDIENTS = "ingredients"  # with a soup: ingredients/<i>/, each anneal ingredient's folder
SOUP = "soup.json"  # in the soup's final/: the averaging rule, the ingredients, which were kept, the losses


class TrainingError(RuntimeError):
    """The training processes failed; the latest complete checkpoint is kept."""


def scheduled(line: dict) -> bool:
    """Whether a metrics line is a step of the schedule's, not of the optimizer warm-up's."""
    return "optimizer_warmup_step" not in line


def scheduled_metrics(train_dir: Path) -> list[dict]:
    """The per-step log in train_dir (the job folder's, or an ingredient's), the schedule's steps only."""
    lines = [json.loads(line) for line in (Path(train_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if scheduled(line)]


def ingredient_folders(folder: Path, ingredients: int, index: int) -> tuple[Path, Path]:
    """(where ingredient `index` trains: its checkpoints/ and metrics.jsonl; where its final/ goes)
    within the stage's (staging) folder. One run: the folder itself for both. With a soup,
    ingredient 0 trains in the folder itself (its checkpoints hold the shared prefix) and exports
    to ingredients/0/, the soup taking final/; ingredient i >= 1 trains and exports in ingredients/<i>/."""
    if ingredients == 1:
        return folder, folder
    own = folder / INGREDIENTS / str(index)
    return (folder if index == 0 else own), own


def training_folders(job_dir: Path) -> list[Path]:
    """The folders training processes write in: the job folder, and each ingredient's with a soup."""
    return [job_dir, *sorted(job_dir.glob(f"{INGREDIENTS}/*"))]
