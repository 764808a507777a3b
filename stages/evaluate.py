"""evaluate: base and candidate side by side on the recipe's benchmarks and on each
source's held-out documents.

Benchmarks are multiple choice, JSONL {"id", "query", "choices", "gold"} with choices
starting with a space, scored as lm-evaluation-harness scores them: the log-likelihood of
each choice's tokens given the query; `acc` picks the highest, `acc_norm` the highest per
character of the choice. Both are reported; which one the audit counts is the recipe's
(stages/lib/scores.py), helped by the longest choice in tokens recorded here.

The query is encoded as the harness encodes it by default: with the tokenizer's own special
tokens (a BOS for tokenizers that add one, such as Llama's; nothing for GPT-2 style byte-level
BPE), no EOS. `evaluate.prefix_eos` puts an EOS before each query instead, for models
pretrained on documents that start after an EOS (as Refit packs them). Validation loss
(nats per token) and bits per byte per source show forgetting of the legacy data and
learning of the new; there every document is predicted after an EOS. Every figure has a
standard error, and every base-candidate difference a paired one (same items, same documents).

Two backends score the benchmarks: "refit" (the `Scorer` below) and "lm-eval" (the same
checkpoints through lm-evaluation-harness, see stages/lib/lm_eval_backend.py, whose task
definitions are kept in `eval/lm_eval_tasks/`). Validation loss is always Refit's own.

Writes `<workdir>/eval/report.json` (atomically, with a done marker).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from refit.stages import curate, train
from refit.stages.curate import curated_files
from refit.stages.lib.config import Recipe
from refit.stages.lib.contract import Stage
from refit.stages.lib.markers import code_version, fingerprint, is_done, staged_output, write_json_atomic, write_marker
from refit.stages.lib.text import read_jsonl

log = logging.getLogger(__name__)
FOLDER = "eval"
BACKENDS = ("refit", "lm-eval")


def mean_stderr(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as the harness
    reports); None where undefined (no values, or one), so reports stay valid JSON."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else None
    return mean, (float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None)


def context_length(config) -> int:
    """Longest input the model takes (longer requests lose tokens on the left)."""
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 1024))


class Scorer:
    """Batched log-likelihoods under one causal LM (eval mode, no gradients, fp32)."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer_dir: Path,
        batch_size: int,
        trust_remote_code: bool = False,
        prefix_eos: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=True, dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
        self.batch_size = batch_size
        self.prefix_eos = prefix_eos
        self.max_len = context_length(self.model.config)
        self.slices_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def continuation_logprobs(self, requests: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation given its context.

        A causal LM's logits at a position depend only on the tokens up to it, so a request
        whose model input (context + continuation less its last token, cut to the model's
        length) is a prefix of another's is read from that one's row: the choices of a
        multiple-choice item that share their first tokens cost one row. Rows are padded on
        the right without an attention mask (causal attention never looks right), and the
        vocabulary projection and softmax run only from the first position read."""
        torch = self.torch
        inputs = [tuple((context + continuation)[-(self.max_len + 1) :][:-1]) for context, continuation in requests]
        rows: list[tuple[int, ...]] = []
        row_of = [0] * len(requests)
        by_tokens = sorted(range(len(requests)), key=inputs.__getitem__)
        for k in reversed(range(len(by_tokens))):  # a prefix sorts just before the inputs that extend it
            i, following = by_tokens[k], by_tokens[k + 1] if k + 1 < len(by_tokens) else None
            if following is not None and inputs[following][: len(inputs[i])] == inputs[i]:
                row_of[i] = row_of[following]
            else:
                row_of[i] = len(rows)
                rows.append(inputs[i])
        readers: list[list[int]] = [[] for _ in rows]
        for i, row in enumerate(row_of):
            readers[row].append(i)
        results: list[np.ndarray | None] = [None] * len(requests)
        longest_first = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
        for first in range(0, len(rows), self.batch_size):
            batch = longest_first[first : first + self.batch_size]
            width = max(len(rows[r]) for r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            batch_rows, positions, targets, spans = [], [], [], []
            for b, r in enumerate(batch):
                ids[b, : len(rows[r])] = torch.tensor(rows[r])
                for i in readers[r]:
                    continuation = requests[i][1]
                    end = len(inputs[i])
                    spans.append((i, len(positions), len(continuation)))
                    batch_rows += [b] * len(continuation)
                    positions += range(end - len(continuation), end)
                    targets += continuation
            keep_from = min(positions, default=width - 1)
            kwargs = {"logits_to_keep": width - keep_from} if self.slices_logits else {}
            with torch.no_grad():
                logits = self.model(input_ids=ids, use_cache=False, **kwargs).logits.float()
                logits = logits[
                    :, logits.shape[1] - (width - keep_from) :
                ]  # positions keep_from.. (all kept if not sliced)
                b_index, p_index = torch.tensor(batch_rows), torch.tensor(positions) - keep_from
                logprobs = logits[b_index, p_index, torch.tensor(targets)] - torch.logsumexp(
                    logits[b_index, p_index], dim=-1
                )
            values = logprobs.numpy().astype(np.float64)
            for i, start, length in spans:
                results[i] = values[start : start + length]
        return results  # type: ignore[return-value]

    def choice_loglikelihoods(self, items: list[dict]) -> list[np.ndarray]:
        """Per item, the log-likelihood of each choice's tokens given the query (encoded with
        the tokenizer's default special tokens, as the harness does; see the module docstring)."""
        texts = [item["query"] for item in items] + [item["query"] + c for item in items for c in item["choices"]]
        encoded = iter(self.tokenizer(texts)["input_ids"]) if texts else iter(())
        prefix = [self.tokenizer.eos_token_id] if self.prefix_eos else []
        contexts = [next(encoded) for _ in items]
        requests = []
        for item, context in zip(items, contexts):
            for _ in item["choices"]:
                whole = next(encoded)
                requests.append((prefix + context, whole[len(context) :] or whole[-1:]))
        sums = iter([values.sum() for values in self.continuation_logprobs(requests)])
        return [np.array([next(sums) for _ in item["choices"]]) for item in items]

    def score_benchmark(self, items: list[dict]) -> dict[str, np.ndarray]:
        """Per-item correctness (acc, acc_norm) for one benchmark."""
        acc, acc_norm = np.zeros(len(items)), np.zeros(len(items))
        for n, (item, lls) in enumerate(zip(items, self.choice_loglikelihoods(items))):
            lengths = np.array([len(c) for c in item["choices"]], dtype=np.float64)
            acc[n] = float(np.argmax(lls) == item["gold"])
            acc_norm[n] = float(np.argmax(lls / lengths) == item["gold"])
        return {"acc": acc, "acc_norm": acc_norm}

    def document_losses(self, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per document: summed NLL (nats), predicted tokens, UTF-8 bytes. Documents longer than
        seq_len are scored in consecutive windows, each predicted from its own start."""
        eos = self.tokenizer.eos_token_id
        requests, owners = [], []
        for n, text in enumerate(texts):
            ids = [eos] + self.encode(text)  # EOS first: the first token is predicted as a document start
            for start in range(0, len(ids) - 1, seq_len):
                window = ids[start : start + seq_len + 1]
                requests.append((window[:1], window[1:]))
                owners.append(n)
        logprobs = self.continuation_logprobs(requests)
        nll, tokens = np.zeros(len(texts)), np.zeros(len(texts))
        for owner, values in zip(owners, logprobs):
            nll[owner] -= values.sum()
            tokens[owner] += len(values)
        return nll, tokens, np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)


def _validation_texts(workdir: Path, source: str) -> list[str]:
    import pyarrow.parquet as pq

    return [t for f in curated_files(workdir, source, "validation") for t in pq.read_table(f)["text"].to_pylist()]


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


def _compare(base: np.ndarray, candidate: np.ndarray) -> dict:
    """Both means with standard errors, and the paired difference with its standard error."""
    (b, b_se), (c, c_se), (d, d_se) = mean_stderr(base), mean_stderr(candidate), mean_stderr(candidate - base)
    return {"base": b, "base_stderr": b_se, "candidate": c, "candidate_stderr": c_se, "delta": d, "delta_stderr": d_se}


def _harness_scores(recipe: Recipe, models: dict[str, Path], tokenizer: Path, task_dir: Path | None) -> dict:
    """Per model name, per benchmark name: lm-evaluation-harness's per-item scores."""
    from transformers import AutoConfig

    from refit.stages.lib import lm_eval_backend

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(task_dir or scratch)
        remote = recipe.base_model.trust_remote_code
        return {
            name: lm_eval_backend.score_benchmarks(
                path,
                tokenizer,
                recipe.evaluate.benchmarks,
                recipe.evaluate.batch_size,
                folder,
                max_length=context_length(AutoConfig.from_pretrained(path, trust_remote_code=remote)),
                trust_remote_code=remote,
            )
            for name, path in models.items()
        }


def evaluate_models(
    recipe: Recipe, workdir: Path, candidate_dir: Path, backend: str = "refit", task_dir: Path | None = None
) -> dict:
    """The report comparing the base model and the candidate (pure computation; only the lm-eval
    backend writes files: its task definitions, into task_dir, else a temporary folder)."""
    tokenizer = Path(recipe.tokenizer or recipe.base_model.path)
    models = {"base": Path(recipe.base_model.path), "candidate": Path(candidate_dir)}
    if backend == "lm-eval" and recipe.evaluate.prefix_eos:
        raise ValueError("evaluate.prefix_eos is not supported by the lm-eval backend: score with --backend refit")
    harness = _harness_scores(recipe, models, tokenizer, task_dir) if backend == "lm-eval" else None
    scorers = {
        name: Scorer(
            path, tokenizer, recipe.evaluate.batch_size, recipe.base_model.trust_remote_code, recipe.evaluate.prefix_eos
        )
        for name, path in models.items()
    }
    benchmarks = {}
    for bench in recipe.evaluate.benchmarks:
        items = read_jsonl(Path(bench.path))
        if harness is not None:
            scores = {name: harness[name][bench.name] for name in models}
        else:
            scores = {name: scorer.score_benchmark(items) for name, scorer in scorers.items()}
        log.info("evaluate: %s scored (%d items, %s)", bench.name, len(scores["base"]["acc"]), backend)
        benchmarks[bench.name] = {
            "domain": bench.domain,
            "items": len(scores["base"]["acc"]),
            "longest_choice_tokens": max(
                (len(scorers["base"].encode(c)) for item in items for c in item["choices"]), default=0
            ),
            **{metric: _compare(scores["base"][metric], scores["candidate"][metric]) for metric in ("acc", "acc_norm")},
        }
    validation = {}
    for source in recipe.sources:
        held_out = _validation_texts(workdir, source.name)
        texts = held_out[: recipe.evaluate.validation_docs]
        if not texts:
            continue
        losses = {name: scorer.document_losses(texts, recipe.tokenize.seq_len) for name, scorer in scorers.items()}
        (base_nll, tokens, nbytes), (candidate_nll, _, _) = losses["base"], losses["candidate"]
        loss = _compare_loss(base_nll, candidate_nll, tokens)
        entry = {
            "role": source.role,
            "docs": len(texts),
            "held_out_docs": len(held_out),
            "tokens": int(tokens.sum()),
            "loss": loss,
            "base_loss_per_token": loss["base"],
            "candidate_loss_per_token": loss["candidate"],
        }
        for name, (nll, _, _) in losses.items():
            entry[f"{name}_bits_per_byte"] = float(nll.sum() / math.log(2) / nbytes.sum())
        validation[source.name] = entry
        log.info(
            "evaluate: %s validation loss %.3f -> %.3f",
            source.name,
            entry["base_loss_per_token"],
            entry["candidate_loss_per_token"],
        )
    return {
        "backend": backend,
        "benchmarks": benchmarks,
        "validation": validation,
        "base_model": str(recipe.base_model.path),
        "candidate_model": str(candidate_dir),
    }


def input_fingerprint(recipe: Recipe, workdir: Path, backend: str = "refit") -> str:
    section = {
        # what the audit counts (metric, weight) changes no score: only the audit reruns
        "evaluate": recipe.evaluate.model_dump(mode="json", exclude={"benchmarks": {"__all__": {"metric", "weight"}}}),
        "base": str(recipe.base_model.path),
        "backend": backend,
    }
    upstream = [train.STAGE.produced(workdir, "evaluate"), curate.STAGE.produced(workdir, "evaluate")]
    return fingerprint("evaluate", section, upstream, code_version(__name__))


def run_evaluate(recipe: Recipe, workdir: Path, force: bool = False, backend: str = "refit") -> dict:
    """backend: "refit" (Refit's scorer) or "lm-eval" (lm-evaluation-harness) for the benchmarks."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown evaluation backend {backend!r}: one of {', '.join(BACKENDS)}")
    workdir = Path(workdir)
    final = workdir / FOLDER
    expected = input_fingerprint(recipe, workdir, backend)
    if not force and is_done(final, expected):
        return read_report(workdir)
    started = time.time()
    with staged_output(final) as out:
        candidate = train.final_model(workdir)
        report = {"stage": "evaluate", **evaluate_models(recipe, workdir, candidate, backend, out / "lm_eval_tasks")}
        report["seconds"] = round(time.time() - started, 2)
        write_json_atomic(out / "report.json", report)
        write_marker(out, "evaluate", expected, started, code_version(__name__))
    return report


def report_path(workdir: Path) -> Path:
    return Path(workdir) / FOLDER / "report.json"


def read_report(workdir: Path) -> dict:
    """The finished evaluation: benchmarks and validation losses, base and candidate."""
    return json.loads(report_path(workdir).read_text())


STAGE = Stage(
    name="evaluate",
    reads=("train", "curate"),
    sections=("evaluate", "base_model"),
    folder=FOLDER,
    run_function=run_evaluate,
    fingerprint_function=input_fingerprint,
    takes=("backend",),
)
