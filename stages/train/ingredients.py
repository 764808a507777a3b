"""The anneal ingredients and their soup, as the train stage runs them (#26, recipe section
`soup`): where the ingredients branch off the shared run, where each trains (written into the
job for the training processes, loop.py's `Ingredient`), which are still to train, what each
reports, and the soup made of their exports (soup.py) in final/ with `soup.json` beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from refit.stages.core.config import Recipe
from refit.stages.core.markers import write_json_atomic
from refit.stages.core.schedule import tokens_per_step
from refit.stages.mix.manifest import Manifest
from refit.stages.train.layout import (
    FINAL_SHA256,
    JOB,
    SOUP,
    VALIDATION,
    TrainingError,
    ingredient_folders,
    scheduled_metrics,
)

log = logging.getLogger(__name__)


class SoupUnplanned(TrainingError):
    """The recipe's soup cannot be made from this run's plan (no branch point, no held-out rows)."""


def branch_step(recipe: Recipe, manifest: Manifest) -> int | None:
    """The step the anneal ingredients branch off the shared run at: where the last phase starts,
    as mix planned it (the phase whose order each ingredient redraws, sampler.py); None without
    a soup. SoupUnplanned, naming the field, when that phase does not start after step 0."""
    ingredients = recipe.soup.ingredients
    if ingredients == 1:
        return None
    last = manifest.phases[-1]
    if len(manifest.phases) > 1 and last.steps and last.start_step > 0:
        return last.start_step
    why = (
        f"it gets no steps in this run's {manifest.total_steps} (its LR trigger never fires)"
        if not last.steps
        else f"it starts at step 0 (its lr_below {last.lr_below} is met from the first step)"
        if len(manifest.phases) > 1
        else "the mixture has one phase"
    )
    raise SoupUnplanned(
        f"soup.ingredients: {ingredients} ingredients branch off the shared run where the last phase "
        f"({last.name}) starts, but {why}: lower that phase's lr_below, or set soup.ingredients to 1"
    )


def soup_job(recipe: Recipe, fingerprint: str, branch: int | None, job_dir: Path) -> dict | None:
    """job["soup"]: where each ingredient trains and exports (relative to the job folder), the
    fingerprint of its checkpoints (one ingredient never resumes another's), the branch step."""
    count = recipe.soup.ingredients
    if count == 1:
        return None
    folders = [ingredient_folders(job_dir, count, i) for i in range(count)]
    return {
        "branch_step": branch,
        "ingredients": [
            {
                "train_dir": str(train_dir.relative_to(job_dir)),
                "export_dir": str(export_dir.relative_to(job_dir)),
                "fingerprint": fingerprint if i == 0 else f"{fingerprint}/ingredient-{i}",
            }
            for i, (train_dir, export_dir) in enumerate(folders)
        ],
    }


def to_train(job_dir: Path, ingredients: int) -> list[int]:
    """The ingredients to launch: a single run always (it resumes, or exports, from its latest
    checkpoint); with a soup, those without a final export yet (an export appears whole)."""
    if ingredients == 1:
        return [0]
    return [i for i in range(ingredients) if not (ingredient_folders(job_dir, ingredients, i)[1] / "final").is_dir()]


def final_state(job_dir: Path, ingredients: int, index: int) -> dict:
    """The trainer state an ingredient's export (the single run's) was made with."""
    export_dir = ingredient_folders(job_dir, ingredients, index)[1]
    return json.loads((export_dir / "final" / "trainer_state.json").read_text())


def final_val_loss(metrics: list[dict]) -> float | None:
    """The held-out loss of the export's weights, scored at the last step's checkpoint (none
    when train.validation_tokens is 0 or no source holds validation documents)."""
    return metrics[-1].get("val_loss")


def ingredient_report(job_dir: Path, ingredients: int, index: int, shared_tokens: int) -> dict:
    state = final_state(job_dir, ingredients, index)
    metrics = scheduled_metrics(ingredient_folders(job_dir, ingredients, index)[0])
    return {
        "index": index,
        "steps": state["step"],
        "tokens": state["tokens"],  # what its model was trained on, the shared prefix's included
        "anneal_tokens": state["tokens"] - shared_tokens,  # trained for it alone
        "final_loss": metrics[-1]["loss"],
        "val_loss": final_val_loss(metrics),
    }


def soup_report(recipe: Recipe, job_dir: Path) -> dict:
    """The train report's account of a soup: `tokens` counting the shared prefix once and each
    ingredient's anneal once, each ingredient's figures, and soup.json with the shared tokens."""
    ingredients = recipe.soup.ingredients
    soup = json.loads((job_dir / "final" / SOUP).read_text())
    shared = soup["branch_step"] * tokens_per_step(recipe)  # the prefix's tokens, trained once
    each = [ingredient_report(job_dir, ingredients, i, shared) for i in range(ingredients)]
    tokens = shared + sum(i["anneal_tokens"] for i in each)
    return {"tokens": tokens, "ingredients": each, "soup": {**soup, "shared_tokens": shared}}


def make_soup(recipe: Recipe, job_dir: Path) -> dict:
    """final/: the average of the ingredients' exports (soup.py), made again by every run that
    gets here (the same bytes: a run killed while averaging just averages again), with
    `soup.json` beside the weights and the sha256 of the weights in FINAL_SHA256."""
    from refit.stages.train.soup import average_weights, greedy_soup, validation_loss_of

    ingredients, method = recipe.soup.ingredients, recipe.soup.method
    finals = [ingredient_folders(job_dir, ingredients, i)[1] / "final" for i in range(ingredients)]
    val_losses = [
        final_val_loss(scheduled_metrics(ingredient_folders(job_dir, ingredients, i)[0])) for i in range(ingredients)
    ]
    soup = {
        "method": method,
        "branch_step": json.loads((job_dir / JOB).read_text())["soup"]["branch_step"],
        "ingredients": [
            {"index": i, "model": str(final.relative_to(job_dir)), "val_loss": loss}
            for i, (final, loss) in enumerate(zip(finals, val_losses))
        ],
    }
    out = job_dir / "final"
    log.info("train: averaging %d ingredients into %s (%s)", ingredients, out, method)
    if method == "uniform":
        digests = average_weights(finals, out)
        soup |= {"kept": list(range(ingredients)), "val_loss": None}
    else:  # best first by the held-out loss each logged at its last checkpoint
        order = sorted(range(ingredients), key=lambda i: (val_losses[i], i))
        device = "cuda" if recipe.train.devices is None else f"cuda:{recipe.train.devices[0]}"
        loss_of = validation_loss_of(
            job_dir / VALIDATION,
            recipe.train.micro_batch_size,
            device if _cuda_available() else "cpu",
            recipe.base_model.trust_remote_code,
        )
        greedy = greedy_soup([finals[i] for i in order], out, loss_of)
        kept = [finals.index(path) for path in greedy.kept]
        soup |= {
            "order": order,  # the order they were tried in
            "kept": kept,
            "tried": [{"index": i, "soup_val_loss": loss} for i, loss in zip(order, greedy.losses)],
            "val_loss": min(loss for i, loss in zip(order, greedy.losses) if i in kept),
        }
        digests = greedy.digests
    (out / "trainer_state.json").unlink(missing_ok=True)  # ingredient 0's, copied with its other files
    write_json_atomic(out / SOUP, soup)
    write_json_atomic(job_dir / FINAL_SHA256, digests)
    log.info("train: soup of ingredients %s in %s", soup["kept"], out)
    return soup


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
