"""evaluate: base and candidate side by side on the recipe's benchmarks and on each
source's held-out documents.

Benchmarks are multiple choice, JSONL {"id", "query", "choices", "gold"} with choices
starting with a space, scored as lm-evaluation-harness scores them: the log-likelihood of
each choice's tokens given the query; `acc` picks the highest, `acc_norm` the highest per
character of the choice. Both are reported; which one the audit counts is the recipe's
(stages/core/scores.py), helped by the longest choice in tokens recorded here.

The query is encoded as the harness encodes it by default: with the tokenizer's own special
tokens (a BOS for tokenizers that add one, such as Llama's; nothing for GPT-2 style byte-level
BPE), no EOS. `evaluate.prefix_eos` puts an EOS before each query instead, for models
pretrained on documents that start after an EOS (as Refit packs them). Validation loss
(nats per token) and bits per byte per source show forgetting of the legacy data and
learning of the new; there every document is predicted after an EOS. Every figure has a
standard error, and every base-candidate difference a paired one (same items, same documents).

Two backends score the benchmarks: "refit" (Refit's `Scorer`, stages/evaluate/scorer.py) and
"lm-eval" (the same checkpoints through lm-evaluation-harness on the same device and dtype,
see stages/evaluate/lm_eval_backend.py, whose task definitions are kept in `eval/lm_eval_tasks/`).
Validation loss is always Refit's own.

Everything Refit's scorer scores is a `ScoringTask` (stages/evaluate/scorer.py): on
`evaluate.device` (bf16 on GPUs), batched longest first, base then candidate (one model in
memory at a time), over `evaluate.num_processes` processes, and the base model's scores
come from the cache in `base_cache_dir` when the same base scored the same things before.
The report says where and how (`scoring`) and whether the base was scored at all (`base_cached`).

With anneal ingredients (recipe section `soup`, #26) the candidate is their soup (train/final/),
so every gate reads the soup; each ingredient (train/ingredients/<i>/final/) is scored in the
same pass on the same benchmark items and validation documents (not the safety probes: those
compare the base and the candidate only), and the report's `soup` section compares the soup with
each ingredient and with the per-item mean of the ingredients, paired, with standard errors
(`_soup_section`); the audit picks the best ingredient by what it counts (stages/audit/soup.py).

Writes `<workdir>/eval/report.json` (atomically, with a done marker).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict

from refit.stages.core.config import Recipe
from refit.stages.core.contract import Stage, StageOptions
from refit.stages.core.input_files import load_benchmark
from refit.stages.core.markers import is_done, staged_output, write_json_atomic, write_marker
from refit.stages.core.scores import METRICS, paired_comparison
from refit.stages.curate import stage as curate
from refit.stages.evaluate.scorer import (
    ScoreCache,
    ScoringSettings,
    ScoringTask,
    choice_loglikelihoods,
    score_models,
)
from refit.stages.train import stage as train
from refit.stages.train.layout import SOUP

log = logging.getLogger(__name__)


@with_config(ConfigDict(extra="forbid"))
class EvaluateReport(TypedDict):
    stage: str
    backend: str
    benchmarks: dict[str, dict]  # per benchmark: domain, metric, acc and acc_norm paired (base, candidate, delta)
    validation: dict[str, dict]  # per source: base and candidate loss per token and bits per byte
    safety: dict  # the safety probes' measurements
    base_model: str
    candidate_model: str
    base_cached: bool
    scoring: dict  # where and how the scores were computed
    seconds: float
    # with anneal ingredients only: the soup (the candidate) against each ingredient and their mean
    soup: NotRequired[dict]


FOLDER = "eval"
SAFETY_NOTE = "the safety probes compare the base and the soup (the candidate) only, not each ingredient"
BACKENDS = ("refit", "lm-eval")


def choice_metrics(items: list[dict], loglikelihoods: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-item correctness of a multiple-choice benchmark from its choices' log-likelihoods:
    `acc` (highest log-likelihood) and `acc_norm` (highest per character of the choice)."""
    acc, acc_norm = np.zeros(len(items)), np.zeros(len(items))
    for n, (item, lls) in enumerate(zip(items, loglikelihoods)):
        lengths = np.array([len(c) for c in item["choices"]], dtype=np.float64)
        acc[n] = float(np.argmax(lls) == item["gold"])
        acc_norm[n] = float(np.argmax(lls / lengths) == item["gold"])
    return {"acc": acc, "acc_norm": acc_norm}


def _ratio(numerators: np.ndarray, denominators: np.ndarray) -> tuple[float, float | None]:
    """Sum(numerators) / sum(denominators), with the ratio estimator's standard error
    (documents are the sampled units; their token counts differ)."""
    n = len(numerators)
    ratio = float(numerators.sum() / denominators.sum())
    if n < 2:
        return ratio, None
    residuals = numerators - ratio * denominators
    return ratio, float(np.sqrt((residuals**2).sum() / (n * (n - 1))) / denominators.mean())


def _compare_loss(base_nll: np.ndarray, candidate_nll: np.ndarray, tokens: np.ndarray) -> dict:
    """Token-weighted loss of both models and their paired difference, with standard errors."""
    (b, b_se), (c, c_se), (d, d_se) = (_ratio(x, tokens) for x in (base_nll, candidate_nll, candidate_nll - base_nll))
    return {"base": b, "base_stderr": b_se, "candidate": c, "candidate_stderr": c_se, "delta": d, "delta_stderr": d_se}


def _harness_scores(
    recipe: Recipe, models: dict[str, Path], tokenizer: Path, settings: ScoringSettings, task_dir: Path | None
) -> dict:
    """Per model name, per benchmark name: lm-evaluation-harness's per-item scores."""
    from refit.stages.evaluate import lm_eval_backend

    benchmarks = recipe.evaluate.benchmarks
    return lm_eval_backend.score_each_model(
        models, tokenizer, settings, task_dir, lambda model: lm_eval_backend.score_benchmarks(model, benchmarks)
    )


def scoring_settings(recipe: Recipe) -> ScoringSettings:
    """The recipe's scoring settings; what evaluate leaves unset follows the training's
    processes and devices on one machine (its machines as the train stage resolves them)."""
    machines = train.resolve_machines(recipe.train, os.environ).count
    return ScoringSettings.resolve(recipe.evaluate, recipe.base_model.trust_remote_code, recipe.train, machines)


def base_cache_dir(recipe: Recipe, workdir: Path) -> Path:
    """evaluate.cache_dir, else `.refit-cache/` in the workdir's parent: a recipe's nightly runs
    (same workdir) and its sweep variants (workdirs side by side in `<workdir>/sweep/`) share it."""
    return Path(recipe.evaluate.cache_dir or Path(workdir).resolve().parent / ".refit-cache")


def evaluate_models(
    recipe: Recipe, workdir: Path, candidate_dir: Path, backend: str = "refit", task_dir: Path | None = None
) -> dict:
    """The report comparing the base model and the candidate (and, when the candidate is a soup,
    the soup and its ingredients: `_soup_section`). Writes only caches: the base's scores (see
    `base_cache_dir`) and, for the lm-eval backend, its task definitions (into task_dir, else a
    temporary folder)."""
    from refit.stages.evaluate import safety_probes as safety

    probes = safety.Probes(recipe.evaluate.safety)  # a malformed probe file fails before any model loads
    items = {bench.name: load_benchmark(Path(bench.path)) for bench in recipe.evaluate.benchmarks}  # and a benchmark
    tokenizer = Path(recipe.tokenizer or recipe.base_model.path)
    models = {"base": Path(recipe.base_model.path), "candidate": Path(candidate_dir)}
    souped = (Path(candidate_dir) / SOUP).is_file()  # the candidate is the soup of the run's ingredients
    ingredients = {f"ingredient-{p.parent.name}": p for p in train.ingredient_models(workdir)} if souped else {}
    if backend == "lm-eval" and recipe.evaluate.prefix_eos:
        raise ValueError("evaluate.prefix_eos is not supported by the lm-eval backend: score with --backend refit")
    settings = scoring_settings(recipe)
    harness = (
        _harness_scores(recipe, models | ingredients, tokenizer, settings, task_dir) if backend == "lm-eval" else None
    )
    texts = {s.name: curate.validation_texts(workdir, s.name, recipe.evaluate.validation_docs) for s in recipe.sources}
    tasks = [] if harness else [ScoringTask(f"benchmark:{name}", "choices", bench) for name, bench in items.items()]
    tasks += [
        ScoringTask(f"validation:{name}", "documents", docs, recipe.tokenize.seq_len)
        for name, docs in texts.items()
        if docs
    ]
    probed = safety.scoring_tasks(probes, models["base"], tokenizer, backend, recipe.base_model.trust_remote_code)
    cache = ScoreCache(base_cache_dir(recipe, workdir), [models["base"], tokenizer], settings)
    scored, summary = score_models(models, tokenizer, tasks + probed, settings, caches={"base": cache})
    if ingredients and tasks:  # the benchmarks and validation sets again, not the safety probes
        more, more_summary = score_models(ingredients, tokenizer, tasks, settings)
        scored, summary = scored | more, summary | more_summary
    pruned = cache.prune(recipe.evaluate.cache_max_age_days) if recipe.evaluate.cache_max_age_days else 0
    from transformers import AutoTokenizer

    encode = AutoTokenizer.from_pretrained(tokenizer)  # each choice's own tokens pick the default metric
    benchmarks, correct = {}, {}
    for bench in recipe.evaluate.benchmarks:
        if harness is not None:
            scores = {name: harness[name][bench.name] for name in models | ingredients}
        else:
            scores = {
                name: choice_metrics(items[bench.name], choice_loglikelihoods(scored[name][f"benchmark:{bench.name}"]))
                for name in models | ingredients
            }
        correct[bench.name] = scores
        log.info("evaluate: %s scored (%d items, %s)", bench.name, len(scores["base"]["acc"]), backend)
        benchmarks[bench.name] = {
            "domain": bench.domain,
            "items": len(scores["base"]["acc"]),
            "longest_choice_tokens": max(
                (
                    len(encode(c, add_special_tokens=False)["input_ids"])
                    for i in items[bench.name]
                    for c in i["choices"]
                ),
                default=0,
            ),
            **{metric: paired_comparison(scores["base"][metric], scores["candidate"][metric]) for metric in METRICS},
        }
    validation, documents = {}, {}
    for source in recipe.sources:
        if not texts[source.name]:
            continue
        losses = {name: scored[name][f"validation:{source.name}"] for name in models | ingredients}
        documents[source.name] = losses
        base_nll, candidate_nll, tokens = losses["base"]["nll"], losses["candidate"]["nll"], losses["base"]["tokens"]
        nbytes = sum(len(t.encode("utf-8")) for t in texts[source.name])
        loss = _compare_loss(base_nll, candidate_nll, tokens)
        entry = {
            "role": source.role,
            "docs": len(texts[source.name]),
            "held_out_docs": curate.validation_count(workdir, source.name),
            "tokens": int(tokens.sum()),
            "loss": loss,
            "base_loss_per_token": loss["base"],
            "candidate_loss_per_token": loss["candidate"],
        }
        for name in models:
            entry[f"{name}_bits_per_byte"] = float(losses[name]["nll"].sum() / math.log(2) / nbytes)
        validation[source.name] = entry
        log.info(
            "evaluate: %s validation loss %.3f -> %.3f",
            source.name,
            entry["base_loss_per_token"],
            entry["candidate_loss_per_token"],
        )
    report = {
        "backend": backend,
        "benchmarks": benchmarks,
        "validation": validation,
        "safety": safety.evaluate_safety(
            recipe, workdir, probes, scored, models, tokenizer, settings, backend, task_dir
        ),
        "base_model": str(recipe.base_model.path),
        "candidate_model": str(candidate_dir),
        "base_cached": summary["base"]["tasks_scored"] == 0 and harness is None,
        "scoring": {
            **dataclasses.asdict(settings),
            "cache_dir": str(cache.folder),
            "base_sha256": cache.model_sha256,
            "models": summary,
            "cache_entries_pruned": pruned,
        },
    }
    if ingredients:
        report["soup"] = _soup_section(Path(candidate_dir), ingredients, correct, documents)
    return report


def _soup_section(
    soup_dir: Path,
    ingredients: dict[str, Path],
    correct: dict[str, dict[str, dict[str, np.ndarray]]],
    documents: dict[str, dict[str, dict[str, np.ndarray]]],
) -> dict:
    """The soup (the candidate, its averaging rule in soup_dir/soup.json) against each of its
    ingredients and against the per-item mean of them all (kept or not), on the same items:
    per benchmark and metric (correct: benchmark -> model -> metric -> per-item correctness) as
    `paired_comparison`s, per validation source (documents: source -> model -> {nll, tokens})
    token-weighted as `_compare_loss`; "base" is the ingredient (or the mean), "candidate" the
    soup, "delta" the soup's difference from it, each with its standard error. Which ingredient
    is the best depends on the counted metrics and weights, the audit's (stages/audit/soup.py)."""
    rule = json.loads((soup_dir / SOUP).read_text())
    names = list(ingredients)
    section = {
        "method": rule["method"],
        "branch_step": rule["branch_step"],
        "kept": rule["kept"],
        "ingredients": [{"index": int(path.parent.name), "model": str(path)} for path in ingredients.values()],
        "safety": SAFETY_NOTE,
        "benchmarks": {},
        "validation": {},
    }
    for bench, scores in correct.items():
        entry: dict = {"items": len(scores["candidate"]["acc"])}
        for metric in METRICS:
            each, soup = [scores[name][metric] for name in names], scores["candidate"][metric]
            entry[metric] = {
                "vs_ingredients": [paired_comparison(ingredient, soup) for ingredient in each],
                "vs_mean": paired_comparison(np.mean(each, axis=0), soup),
            }
        section["benchmarks"][bench] = entry
    for source, losses in documents.items():
        each, soup, tokens = (
            [losses[name]["nll"] for name in names],
            losses["candidate"]["nll"],
            losses["base"]["tokens"],
        )
        section["validation"][source] = {
            "vs_ingredients": [_compare_loss(ingredient, soup, tokens) for ingredient in each],
            "vs_mean": _compare_loss(np.mean(each, axis=0), soup, tokens),
        }
    return section


def other_inputs(recipe: Recipe, workdir: Path) -> dict:
    """The scoring settings as resolved here: the device and precision "auto" means on this machine."""
    return {"scoring": scoring_settings(recipe).numerics()}


def run_evaluate(recipe: Recipe, workdir: Path, force: bool = False, backend: str = "refit") -> EvaluateReport:
    """backend: "refit" (Refit's scorer) or "lm-eval" (lm-evaluation-harness) for the benchmarks."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown evaluation backend {backend!r}: one of {', '.join(BACKENDS)}")
    workdir = Path(workdir)
    final = workdir / FOLDER
    expected = STAGE.input_fingerprint(recipe, workdir, StageOptions(backend=backend))
    if not force and is_done(final, expected):
        return read_report(workdir)
    started = time.time()
    with staged_output(final) as out:
        candidate = train.final_model(workdir)
        report = {"stage": "evaluate", **evaluate_models(recipe, workdir, candidate, backend, out / "lm_eval_tasks")}
        report["seconds"] = round(time.time() - started, 2)
        write_json_atomic(out / "report.json", report)
        write_marker(out, "evaluate", expected, started, STAGE.code_version)
    return report


def report_path(workdir: Path) -> Path:
    return Path(workdir) / FOLDER / "report.json"


def read_report(workdir: Path) -> EvaluateReport:
    """The finished evaluation: benchmarks and validation losses, base and candidate."""
    return json.loads(report_path(workdir).read_text())


STAGE = Stage(
    name="evaluate",
    reads=(train.STAGE, curate.STAGE),
    recipe_reads=(
        # not what the audit counts (benchmarks' metric and weight): that changes no score
        *("evaluate.benchmarks.name", "evaluate.benchmarks.path", "evaluate.benchmarks.domain", "evaluate.safety"),
        *("evaluate.validation_docs", "evaluate.batch_size", "evaluate.device", "evaluate.precision"),
        *("evaluate.num_processes", "evaluate.prefix_eos", "evaluate.cache_dir", "evaluate.cache_max_age_days"),
        *("base_model.path", "base_model.trust_remote_code", "tokenizer", "tokenize.seq_len", "sources"),
        "train",  # its processes and devices, which scoring follows
    ),
    folder=FOLDER,
    report=EvaluateReport,
    run_function=run_evaluate,
    other_inputs=other_inputs,
    takes=("backend",),
)
