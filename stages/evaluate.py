"""evaluate: base and candidate side by side on the recipe's benchmarks and on each
source's held-out documents.

Benchmarks are multiple choice, JSONL {"id", "query", "choices", "gold"} with choices
starting with a space, scored as lm-evaluation-harness scores them: the log-likelihood of
each choice's tokens given the query; `acc` picks the highest, `acc_norm` the highest per
character of the choice. Validation loss (nats per token) and bits per byte per source
show forgetting of the legacy data and learning of the new. Every figure has a standard
error, and every base-candidate difference a paired one (same items, same documents).

Writes `<workdir>/eval/report.json` (atomically, with a done marker).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from stages.config import Recipe
from stages.curate import curated_files
from stages.text import read_jsonl
from stages.markers import (fingerprint, is_done, stage_dir, staging_dir, swap_into_place, upstream_fingerprint,
                            write_json_atomic, write_marker)

log = logging.getLogger(__name__)


def mean_stderr(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as the harness
    reports); None where undefined (no values, or one), so reports stay valid JSON."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else None
    return mean, (float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None)


class Scorer:
    """Batched log-likelihoods under one causal LM (eval mode, no gradients, fp32)."""

    def __init__(self, model_dir: Path, tokenizer_dir: Path, batch_size: int, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code).eval()
        self.batch_size = batch_size
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or getattr(self.model.config, "n_positions", 1024))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def continuation_logprobs(self, requests: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation given its context."""
        torch = self.torch
        results: list[np.ndarray | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            inputs = [(requests[i][0] + requests[i][1])[-(self.max_len + 1):][:-1] for i in chunk]
            width = max(len(x) for x in inputs)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, :len(x)] = torch.tensor(x)
                mask[row, :len(x)] = 1
            with torch.no_grad():
                logprobs = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                continuation = requests[i][1]
                end = len(inputs[row])
                positions = torch.arange(end - len(continuation), end)
                targets = torch.tensor(continuation)
                results[i] = logprobs[row, positions, targets].numpy().astype(np.float64)
        return results  # type: ignore[return-value]

    def score_benchmark(self, items: list[dict]) -> dict[str, np.ndarray]:
        """Per-item correctness (acc, acc_norm) for one benchmark."""
        requests, owners = [], []
        for n, item in enumerate(items):
            context = self.encode(item["query"])
            for choice in item["choices"]:
                whole = self.encode(item["query"] + choice)
                requests.append((context, whole[len(context):] or whole[-1:]))
                owners.append(n)
        logprobs = self.continuation_logprobs(requests)
        acc, acc_norm, k = np.zeros(len(items)), np.zeros(len(items)), 0
        for n, item in enumerate(items):
            lls = np.array([logprobs[k + j].sum() for j in range(len(item["choices"]))])
            lengths = np.array([len(c) for c in item["choices"]], dtype=np.float64)
            acc[n] = float(np.argmax(lls) == item["gold"])
            acc_norm[n] = float(np.argmax(lls / lengths) == item["gold"])
            k += len(item["choices"])
        return {"acc": acc, "acc_norm": acc_norm}

    def document_losses(self, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per document: summed NLL (nats), predicted tokens, UTF-8 bytes. Documents longer than
        seq_len are scored in consecutive windows, each predicted from its own start."""
        eos = self.tokenizer.eos_token_id
        requests, owners = [], []
        for n, text in enumerate(texts):
            ids = [eos] + self.encode(text)  # EOS first: the first token is predicted as a document start
            for start in range(0, len(ids) - 1, seq_len):
                window = ids[start:start + seq_len + 1]
                requests.append((window[:1], window[1:]))
                owners.append(n)
        logprobs = self.continuation_logprobs(requests)
        nll, tokens = np.zeros(len(texts)), np.zeros(len(texts))
        for owner, values in zip(owners, logprobs):
            nll[owner] -= values.sum()
            tokens[owner] += len(values)
        return nll, tokens, np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)


def _validation_texts(workdir: Path, source: str, limit: int) -> list[str]:
    import pyarrow.parquet as pq

    texts = [t for f in curated_files(workdir, source, "validation") for t in pq.read_table(f)["text"].to_pylist()]
    return texts[:limit]


def _ratio(numerators: np.ndarray, denominators: np.ndarray) -> tuple[float, float | None]:
    """Sum(numerators) / sum(denominators), with the ratio estimator's standard error
    (documents are the sampled units; their token counts differ)."""
    n = len(numerators)
    ratio = float(numerators.sum() / denominators.sum())
    if n < 2:
        return ratio, None
    residuals = numerators - ratio * denominators
    return ratio, float(np.sqrt((residuals ** 2).sum() / (n * (n - 1))) / denominators.mean())


def _compare_loss(base_nll: np.ndarray, candidate_nll: np.ndarray, tokens: np.ndarray) -> dict:
    """Token-weighted loss of both models and their paired difference, with standard errors."""
    (b, b_se), (c, c_se), (d, d_se) = (_ratio(x, tokens) for x in (base_nll, candidate_nll, candidate_nll - base_nll))
    return {"base": b, "base_stderr": b_se, "candidate": c, "candidate_stderr": c_se, "delta": d, "delta_stderr": d_se}


def _compare(base: np.ndarray, candidate: np.ndarray) -> dict:
    """Both means with standard errors, and the paired difference with its standard error."""
    (b, b_se), (c, c_se), (d, d_se) = mean_stderr(base), mean_stderr(candidate), mean_stderr(candidate - base)
    return {"base": b, "base_stderr": b_se, "candidate": c, "candidate_stderr": c_se, "delta": d, "delta_stderr": d_se}


def evaluate_models(recipe: Recipe, workdir: Path, candidate_dir: Path) -> dict:
    """The report comparing the base model and the candidate (pure computation, no files written)."""
    tokenizer = Path(recipe.tokenizer or recipe.base_model.path)
    scorers = {name: Scorer(path, tokenizer, recipe.evaluate.batch_size, recipe.base_model.trust_remote_code)
               for name, path in (("base", Path(recipe.base_model.path)), ("candidate", candidate_dir))}
    benchmarks = {}
    per_item_acc = {"base": [], "candidate": []}
    for bench in recipe.evaluate.benchmarks:
        items = read_jsonl(Path(bench.path))
        scores = {name: scorer.score_benchmark(items) for name, scorer in scorers.items()}
        log.info("evaluate: %s scored (%d items)", bench.name, len(items))
        benchmarks[bench.name] = {"domain": bench.domain, "items": len(items),
                                  **{metric: _compare(scores["base"][metric], scores["candidate"][metric])
                                     for metric in ("acc", "acc_norm")}}
        for name in per_item_acc:
            per_item_acc[name].append(scores[name]["acc"])
    average = None
    if benchmarks:  # the unweighted mean of benchmark accuracies, with the stderr of that mean
        means = {name: float(np.mean([a.mean() for a in accs])) for name, accs in per_item_acc.items()}
        def stderr_of_average(per_benchmark: list[np.ndarray]) -> float | None:
            errors = [mean_stderr(values)[1] for values in per_benchmark]
            return None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(errors)

        pairs = [c - b for b, c in zip(per_item_acc["base"], per_item_acc["candidate"])]
        average = {"base": means["base"], "base_stderr": stderr_of_average(per_item_acc["base"]),
                   "candidate": means["candidate"], "candidate_stderr": stderr_of_average(per_item_acc["candidate"]),
                   "delta": means["candidate"] - means["base"], "delta_stderr": stderr_of_average(pairs)}
    validation = {}
    for source in recipe.sources:
        texts = _validation_texts(workdir, source.name, recipe.evaluate.validation_docs)
        if not texts:
            continue
        losses = {name: scorer.document_losses(texts, recipe.tokenize.seq_len) for name, scorer in scorers.items()}
        (base_nll, tokens, nbytes), (candidate_nll, _, _) = losses["base"], losses["candidate"]
        loss = _compare_loss(base_nll, candidate_nll, tokens)
        entry = {"role": source.role, "docs": len(texts), "tokens": int(tokens.sum()), "loss": loss,
                 "base_loss_per_token": loss["base"], "candidate_loss_per_token": loss["candidate"]}
        for name, (nll, _, _) in losses.items():
            entry[f"{name}_bits_per_byte"] = float(nll.sum() / math.log(2) / nbytes.sum())
        validation[source.name] = entry
        log.info("evaluate: %s validation loss %.3f -> %.3f", source.name, entry["base_loss_per_token"],
                 entry["candidate_loss_per_token"])
    return {"benchmarks": benchmarks, "average_acc": average, "validation": validation,
            "base_model": str(recipe.base_model.path), "candidate_model": str(candidate_dir)}


def run_evaluate(recipe: Recipe, workdir: Path, force: bool = False) -> dict:
    workdir = Path(workdir)
    final = stage_dir(workdir, "evaluate")
    section = {"evaluate": recipe.evaluate.model_dump(mode="json"), "base": str(recipe.base_model.path)}
    input_fingerprint = fingerprint("evaluate", section, [upstream_fingerprint(workdir, "train", "evaluate"),
                                                          upstream_fingerprint(workdir, "curate", "evaluate")])
    if not force and is_done(final, input_fingerprint):
        return json.loads((final / "report.json").read_text())
    started = time.time()
    report = {"stage": "evaluate", **evaluate_models(recipe, workdir, workdir / "train" / "final")}
    report["seconds"] = round(time.time() - started, 2)
    out = staging_dir(final)
    write_json_atomic(out / "report.json", report)
    write_marker(out, "evaluate", input_fingerprint, started)
    swap_into_place(out, final)
    return report
