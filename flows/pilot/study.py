"""Bayesian pilot search (`refit sweep --search tpe --trials N`): the space, the study and its outputs.

The space comes from the recipe's `sweep.search` section; each trial is a variant of the
recipe (flows/pilot/variants.py) named after its settings, so a trial interrupted by a kill is
proposed again with the same settings and resumes from its checkpoints. The study is kept
in Optuna's SQLite storage in `<workdir>/sweep/search.db`: a rerun loads it and only runs
the trials still missing, drawn by a sampler seeded anew. Trials maximise the average
benchmark accuracy; the pruner reads, at each checkpoint, minus the validation loss the
training processes logged there.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from refit.flows.pilot.variants import SweepError, Variant
from refit.stages.core.config import Recipe
from refit.stages.train.stage import StopTraining

SEARCHES = ("tpe",)
STORAGE = "search.db"
ROW = "row"  # the trial's results row, kept in the study so a resumed search does not rerun it
INTERRUPTED = "interrupted"  # study attribute: trials a kill left running, proposed again


def _last_phase(recipe: Recipe) -> tuple[int, dict[str, float]]:
    return len(recipe.phases) - 1, recipe.phases[-1].weights


def space(recipe: Recipe) -> dict[str, BaseDistribution]:
    """The distributions of the searched recipe fields, by dotted path (null ranges are left out);
    SweepError for a recipe the search cannot run."""
    search = recipe.sweep.search
    if search.pruner != "none" and not recipe.train.validation_tokens:
        raise SweepError(
            f"sweep.search.pruner: {search.pruner} prunes on the validation loss at checkpoints, which "
            "train.validation_tokens: 0 turns off (give it tokens, or set the pruner to none)"
        )
    last, weights = _last_phase(recipe)
    max_lr = search.max_lr or (recipe.peak_lr / 3, recipe.peak_lr * 3)
    dims: dict[str, BaseDistribution] = {"schedule.max_lr": FloatDistribution(*max_lr, log=True)}
    if search.min_lr_ratio is not None:
        dims["schedule.min_lr_ratio"] = FloatDistribution(*search.min_lr_ratio, log=True)
    if len(search.decay) > 1:
        dims["schedule.decay"] = CategoricalDistribution(search.decay)
    if search.lr_below is not None:
        if last == 0:
            raise SweepError("sweep.search.lr_below: the recipe has one phase, so no switch to search (set it null)")
        dims[f"mixture.phases.{last}.lr_below"] = FloatDistribution(*search.lr_below)
    if search.qa_share is not None:
        qa = {s.name for s in recipe.sources if s.role == "qa"}
        if not qa & set(weights) or not set(weights) - qa:
            raise SweepError(
                "sweep.search.qa_share: the last phase needs QA and other sources to share it out (set it null)"
            )
        dims["qa_share"] = FloatDistribution(*search.qa_share)
    return dims


def trial_overrides(recipe: Recipe, params: dict[str, Any]) -> dict[str, Any]:
    """The recipe fields a trial's parameters set; qa_share rescales the last phase's weights."""
    overrides = {key: value for key, value in params.items() if key != "qa_share"}
    if "qa_share" in params:
        last, weights = _last_phase(recipe)
        qa = {s.name for s in recipe.sources if s.role == "qa"}
        share = params["qa_share"]
        qa_total = sum(w for n, w in weights.items() if n in qa)
        rest_total = sum(w for n, w in weights.items() if n not in qa)
        overrides[f"mixture.phases.{last}.weights"] = {
            n: (share * w / qa_total if n in qa else (1 - share) * w / rest_total) for n, w in weights.items()
        }
    return overrides


def trial_variant(recipe: Recipe, params: dict[str, Any]) -> Variant:
    """A variant named after its settings: the same settings reuse the same workdir."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    description = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return Variant(f"tpe-{digest}", "grid", trial_overrides(recipe, params), description)


def open_study(recipe: Recipe, sweep_dir: Path) -> optuna.Study:
    """The recipe's study in `<sweep_dir>/search.db`, created or loaded."""
    search = recipe.sweep.search
    pruner: optuna.pruners.BasePruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=0),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
        "none": optuna.pruners.NopPruner,
    }[search.pruner]()
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=recipe.name,
        storage=f"sqlite:///{Path(sweep_dir).resolve() / STORAGE}",
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )
    # Seeded by the trials already in the study too: a rerun's sampler seeded like the first run's
    # would replay its draws and propose settings already tried (the same variant, listed twice)
    seed = int(np.random.SeedSequence([search.seed, len(study.get_trials(deepcopy=False))]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.startup_trials)
    return study


def requeue_interrupted(study: optuna.Study, distributions: dict[str, BaseDistribution]) -> list[int]:
    """Trials left running by a killed search: marked failed and, when their settings were
    all drawn, proposed again with them (so they resume from their checkpoints). Their numbers."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        if set(trial.params) == set(distributions):  # else killed while being proposed: nothing ran
            study.enqueue_trial(trial.params, skip_if_exists=False)
        study.tell(trial.number, state=TrialState.FAIL)
    if stale:
        study.set_user_attr(INTERRUPTED, [*study.user_attrs.get(INTERRUPTED, []), *(t.number for t in stale)])
    return [t.number for t in stale]


def trials_done(study: optuna.Study) -> int:
    """Trials that ran to an outcome (complete, pruned or failed), not counting interrupted ones."""
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in finished and t.number not in interrupted for t in study.get_trials(deepcopy=False))


def _trials_with_rows(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that ran to an outcome, in trial order; not one killed after its row was kept,
    as its rerun has one too."""
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    return [t for t in study.get_trials(deepcopy=False) if ROW in t.user_attrs and t.number not in interrupted]


def trial_rows(study: optuna.Study) -> list[dict]:
    """The results rows of every trial that ran to an outcome, in trial order."""
    return [t.user_attrs[ROW] for t in _trials_with_rows(study)]


class CheckpointPruning:
    """The train stage's on_progress for a trial: report minus each validation loss the training
    processes logged at a checkpoint (`val_loss` in metrics.jsonl, at the step the checkpoint
    counts: optimizer steps done), and stop training when the pruner says so.

    Every trial scores the same held-out rows (train.validation_tokens of the shared curated
    validation documents), so the values compare across trials whatever blend each trains on
    after its switch; the training loss would not, as a trial with more QA data sees another mix."""

    def __init__(self, trial: optuna.Trial, metrics: Path):
        self.trial, self.metrics, self.reported = trial, Path(metrics), 0

    def __call__(self, line: dict) -> None:
        if line["step"] + 1 <= self.reported or not self.metrics.is_file():  # nothing new logged
            return
        for text in self.metrics.read_text().splitlines():
            entry = json.loads(text) if text.endswith("}") else {}  # the writer may be mid-line
            step = entry.get("step", -1) + 1
            if "val_loss" not in entry or step <= self.reported:
                continue
            self.trial.report(-entry["val_loss"], step)
            self.reported = step
            if self.trial.should_prune():
                raise StopTraining(f"pruned at step {step}: its validation loss is worse than the other trials' there")


def best_vs_compute(study: optuna.Study) -> list[dict]:
    """Trial by trial: cumulative device-seconds spent and the best weighted average accuracy so far."""
    spent, best, points = 0.0, None, []
    for trial in _trials_with_rows(study):
        spent += trial.user_attrs[ROW].get("device_seconds") or 0.0
        if trial.state == TrialState.COMPLETE:
            best = trial.value if best is None else max(best, trial.value)
        points.append({"trial": trial.number, "device_seconds": spent, "best": best, "state": trial.state.name})
    return points


def _plot_best_vs_compute(points: list[dict], baselines: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    reached = [p for p in points if p["best"] is not None]
    ax.step(
        [p["device_seconds"] for p in reached],
        [100 * p["best"] for p in reached],
        where="post",
        marker="o",
        label="TPE",
    )
    for row in baselines:
        if row["status"] == "ok" and row["score"] is not None:
            ax.axhline(100 * row["score"], color="tab:gray", ls="--", lw=1)
            ax.annotate(row["variant"], (0, 100 * row["score"]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("device-seconds spent by the search (training, pruned trials included)")
    ax.set_ylabel("best average accuracy so far (points)")
    ax.set_title("TPE search: best value against compute (dashed: baselines)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_search_outputs(study: optuna.Study, baselines: list[dict], sweep_dir: Path) -> dict[str, str]:
    """best_vs_compute.png, importances.png and slice.png (Optuna's matplotlib plots) and the
    trials table appended to results.md; returns the plots written, or why one was not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    sweep_dir = Path(sweep_dir)
    points = best_vs_compute(study)
    _plot_best_vs_compute(points, baselines, sweep_dir / "best_vs_compute.png")
    plots = {"best_vs_compute": "best_vs_compute.png"}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    for name, draw in (("importances", optuna_plots.plot_param_importances), ("slice", optuna_plots.plot_slice)):
        if len(complete) < 2:
            plots[name] = f"not drawn: {len(complete)} complete trial(s), need 2"
            continue
        try:
            with warnings.catch_warnings():  # "experimental" since Optuna 2.2; the PNG is what we keep
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(study)
        except (ValueError, RuntimeError) as error:  # e.g. every complete trial has the same value
            plots[name] = f"not drawn: {error}"
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.tight_layout()
        figure.savefig(sweep_dir / f"{name}.png", dpi=110)
        plt.close(figure)
        plots[name] = f"{name}.png"
    lines = [
        "",
        "## TPE trials",
        "",
        "| trial | state | variant | settings | avg acc | device-s so far |",
        "|---|---|---|---|---|---|",
    ]
    for trial, point in zip(_trials_with_rows(study), points):
        row = trial.user_attrs[ROW]
        value = f"{100 * trial.value:.1f}" if trial.state == TrialState.COMPLETE else row.get("error", "")
        lines.append(
            f"| {trial.number} | {trial.state.name.lower()} | {row['variant']} | {row['description']} | {value} "
            f"| {point['device_seconds']:.0f} |"
        )
    lines += [""] + [
        f"![{name}]({path})" if path.endswith(".png") else f"{name}: {path}" for name, path in plots.items()
    ]
    with open(sweep_dir / "results.md", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return plots
