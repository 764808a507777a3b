"""lm-evaluation-harness as a second scorer of the recipe's benchmarks (`--backend lm-eval`).

For each benchmark file this writes a local harness task definition (YAML) that reads the
JSONL as it is (`dataset_path: json`), asks for the log-likelihood of every choice after the
query, and counts `acc` and `acc_norm` (by characters) as Refit's own scorer does. The
harness then runs in-process and offline on the same checkpoint directory, on the same
device, in the same dtype and with the same batch size as Refit's scorer.
`target_delimiter` is empty because Refit's choices already start with a space, and the
harness's default `add_bos_token` (the tokenizer's own special tokens) is kept, which
Refit's scorer follows, so the harness scores exactly the tokens Refit scores.

The harness is optional: `pip install 'refit[lm-eval]'`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import yaml

from refit.stages.core.config import BenchmarkSpec
from refit.stages.core.input_files import load_benchmark
from refit.stages.evaluate.scorer import ScoringSettings, context_length, free_memory

log = logging.getLogger(__name__)
INSTALL_HINT = "the lm-eval backend needs lm-evaluation-harness: pip install 'refit[lm-eval]'"


def task_name(bench: BenchmarkSpec) -> str:
    return f"refit_{bench.name}"


def task_definition(bench: BenchmarkSpec) -> dict:
    """The harness task for one Refit benchmark file: zero-shot multiple choice on its items."""
    return {
        "task": task_name(bench),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(bench.path).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",  # field names: the harness reads them from each record
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # choices already start with a space
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }


def write_tasks(benchmarks: list[BenchmarkSpec], folder: Path) -> Path:
    """One `<task>.yaml` per benchmark in folder (created); returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for bench in benchmarks:
        (folder / f"{task_name(bench)}.yaml").write_text(yaml.safe_dump(task_definition(bench), sort_keys=False))
    return folder


def _import_harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return lm_eval, TaskManager


@dataclass(frozen=True)
class HarnessModel:
    """One model as the harness runs it: its checkpoint and tokenizer, where the task
    definitions are written, and the batch size, device ("cpu", "cuda") and dtype (a torch
    dtype name) of Refit's scorer, with the model's context length."""

    model_dir: Path
    tokenizer_dir: Path
    task_dir: Path
    batch_size: int
    device: str = "cpu"
    dtype: str = "float32"
    max_length: int | None = None
    trust_remote_code: bool = False

    @classmethod
    def like(cls, settings: ScoringSettings, model_dir: Path, tokenizer_dir: Path, task_dir: Path) -> HarnessModel:
        """The model run as Refit's scorer runs with settings, up to the model's own context length."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)
        return cls(
            Path(model_dir),
            Path(tokenizer_dir),
            Path(task_dir),
            settings.batch_size,
            settings.device,
            settings.dtype,
            context_length(config),
            settings.trust_remote_code,
        )


Scores = TypeVar("Scores")


def score_each_model(
    models: dict[str, Path],
    tokenizer_dir: Path,
    settings: ScoringSettings,
    task_dir: Path | None,
    score: Callable[[HarnessModel], Scores],
) -> dict[str, Scores]:
    """Per model name, score(model) on the scorer's device and dtype, one model in memory at a
    time (in this process: evaluate.num_processes applies to Refit's own scorer). Task
    definitions go to task_dir, else to a temporary folder."""
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, path in models.items():
            results[name] = score(HarnessModel.like(settings, path, tokenizer_dir, Path(task_dir or scratch)))
            free_memory(settings.device)
    return results


def _evaluate(model: HarnessModel, tasks: list[str]) -> dict:
    """The harness's output for local tasks in the model's task_dir, with its default special tokens."""
    lm_eval, TaskManager = _import_harness()
    model_args = {
        "pretrained": str(model.model_dir),
        "tokenizer": str(model.tokenizer_dir),
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
    }
    if model.max_length:
        model_args["max_length"] = model.max_length
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        device=model.device,
        batch_size=model.batch_size,
        task_manager=TaskManager(include_path=str(model.task_dir), include_defaults=False),
        log_samples=True,
    )


def score_benchmarks(model: HarnessModel, benchmarks: list[BenchmarkSpec]) -> dict[str, dict]:
    """Score every benchmark with the harness, one model. Per benchmark, in the file's item order:
    `acc` and `acc_norm` (0/1 per item, the harness's own per-item decisions, the shape of
    `evaluate.choice_metrics`), `loglikelihoods` (one array of choice log-likelihoods per item),
    and `reported`: the harness's own aggregate figures (acc, acc_stderr, acc_norm, acc_norm_stderr)."""
    if not benchmarks:
        return {}
    write_tasks(benchmarks, model.task_dir)
    output = _evaluate(model, [task_name(b) for b in benchmarks])
    scores = {}
    for bench in benchmarks:
        name = task_name(bench)
        items = load_benchmark(Path(bench.path))
        samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
        if [s["doc"]["id"] for s in samples] != [item["id"] for item in items]:
            raise RuntimeError(f"lm-eval scored other items than {bench.path} holds")
        figures = output["results"][name]
        scores[bench.name] = {
            "acc": np.array([s["acc"] for s in samples], dtype=np.float64),
            "acc_norm": np.array([s["acc_norm"] for s in samples], dtype=np.float64),
            "loglikelihoods": [np.array([ll for ll, _ in s["filtered_resps"]]) for s in samples],
            "reported": {
                metric: figures[f"{metric},none"] for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
            },
        }
        log.info(
            "evaluate (lm-eval): %s acc %.4f on %d items of %s",
            bench.name,
            figures["acc,none"],
            len(samples),
            model.model_dir,
        )
    return scores


CROWS_PAIRS_TASK = "refit_crows_pairs_english"


def crows_pairs_task(data_file: Path) -> dict:
    """The harness's own `crows_pairs_english` (its choices, its `process_results`: a pair is
    stereotyped when sent_more scores higher) on a local JSONL of pairs instead of the hub copy."""
    import lm_eval

    harness_task = Path(lm_eval.__file__).parent / "tasks" / "crows_pairs" / "crows_pairs_english.yaml"
    return {
        "include": str(harness_task),
        "task": CROWS_PAIRS_TASK,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
    }


def score_crows_pairs(model: HarnessModel, pairs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(sent_more, sent_less) log-likelihoods of each pair, in order, from the harness."""
    _import_harness()
    model.task_dir.mkdir(parents=True, exist_ok=True)
    data_file = model.task_dir / f"{CROWS_PAIRS_TASK}.jsonl"
    data_file.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    task = yaml.safe_dump(crows_pairs_task(data_file), sort_keys=False)
    (model.task_dir / f"{CROWS_PAIRS_TASK}.yaml").write_text(task)
    output = _evaluate(model, [CROWS_PAIRS_TASK])
    samples = sorted(output["samples"][CROWS_PAIRS_TASK], key=lambda s: s["doc_id"])
    if [s["doc"]["id"] for s in samples] != [pair["id"] for pair in pairs]:
        raise RuntimeError("lm-eval scored other CrowS-Pairs pairs than it was given")
    lls = np.array([[ll for ll, _ in s["filtered_resps"]] for s in samples], dtype=np.float64)
    log.info(
        "evaluate (lm-eval): crows_pairs_english pct_stereotype %.4f on %d pairs of %s",
        output["results"][CROWS_PAIRS_TASK]["pct_stereotype,none"],
        len(pairs),
        model.model_dir,
    )
    return lls[:, 0], lls[:, 1]
