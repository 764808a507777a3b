"""evaluate: log-likelihood scoring as the harness does it, batched and deterministic;
validation loss and bits per byte; standard errors and paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refit.stages.evaluate import Scorer, _compare, mean_stderr

ITEMS = [
    {
        "id": "a",
        "query": "SELECT name FROM users WHERE id",
        "choices": [" = 1;", " integer", " return a + b"],
        "gold": 0,
    },
    {"id": "b", "query": "def add(a, b):\n   ", "choices": [" return a + b", " FROM users", " x"], "gold": 0},
    {
        "id": "c",
        "query": "The learning rate decays along a",
        "choices": [" cosine.", " table", " SELECT name FROM users"],
        "gold": 0,
    },
]


def direct_logprob(model_dir, query: str, choice: str) -> float:
    """Sum of log p(choice tokens | query), one unpadded sequence at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    context = tokenizer(query, add_special_tokens=False)["input_ids"]
    whole = tokenizer(query + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(context), len(whole))))


def test_choice_loglikelihoods_match_a_direct_computation_at_any_batch_size(tiny_model_dir):
    scorers = [Scorer(tiny_model_dir, tiny_model_dir, batch_size=b) for b in (1, 4)]
    requests = []
    for item in ITEMS:
        context = scorers[0].encode(item["query"])
        for choice in item["choices"]:
            requests.append((context, scorers[0].encode(item["query"] + choice)[len(context) :]))
    one, four = (np.array([lp.sum() for lp in s.continuation_logprobs(requests)]) for s in scorers)
    expected = [direct_logprob(tiny_model_dir, i["query"], c) for i in ITEMS for c in i["choices"]]
    assert one == pytest.approx(expected, abs=1e-4)
    assert four == pytest.approx(expected, abs=1e-4)  # right padding does not leak into scores


def test_acc_and_acc_norm_follow_the_harness_definitions(tiny_model_dir):
    scorer = Scorer(tiny_model_dir, tiny_model_dir, batch_size=8)
    scores = scorer.score_benchmark(ITEMS)
    for n, item in enumerate(ITEMS):
        lls = np.array([direct_logprob(tiny_model_dir, item["query"], c) for c in item["choices"]])
        assert scores["acc"][n] == float(np.argmax(lls) == item["gold"])
        per_char = lls / np.array([len(c) for c in item["choices"]])
        assert scores["acc_norm"][n] == float(np.argmax(per_char) == item["gold"])
    again = scorer.score_benchmark(ITEMS)
    assert all(np.array_equal(scores[k], again[k]) for k in scores)  # deterministic


def test_document_loss_and_bits_per_byte(tiny_model_dir):
    scorer = Scorer(tiny_model_dir, tiny_model_dir, batch_size=2)
    texts = ["CREATE TABLE t (x integer); " * 6, "def add(a, b):\n    return a + b\n"]
    nll, tokens, nbytes = scorer.document_losses(texts, seq_len=16)
    eos = scorer.tokenizer.eos_token_id
    for n, text in enumerate(texts):
        ids = [eos] + scorer.encode(text)
        assert tokens[n] == len(ids) - 1 and nbytes[n] == len(text.encode())
        expected = 0.0
        for start in range(0, len(ids) - 1, 16):  # windows of 16 predicted tokens, each from its start
            window = ids[start : start + 17]
            with torch.no_grad():
                logprobs = torch.log_softmax(scorer.model(input_ids=torch.tensor([window[:-1]])).logits[0], dim=-1)
            expected -= float(sum(logprobs[i, window[i + 1]] for i in range(len(window) - 1)))
        assert nll[n] == pytest.approx(expected, rel=1e-5)
    assert 0 < nll.sum() / math.log(2) / nbytes.sum() < 20  # bits per byte of an untrained model


def test_standard_errors_and_paired_difference():
    base = np.array([1, 0, 1, 0, 1, 1, 0, 0], dtype=float)
    candidate = np.array([1, 1, 1, 0, 1, 1, 1, 0], dtype=float)
    mean, se = mean_stderr(base)
    assert mean == 0.5 and se == pytest.approx(np.std(base, ddof=1) / math.sqrt(8))
    compared = _compare(base, candidate)
    assert compared["delta"] == pytest.approx(0.25)
    assert compared["delta_stderr"] == pytest.approx(np.std(candidate - base, ddof=1) / math.sqrt(8))


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_stage_reports_base_and_candidate_side_by_side(trained):
    from refit.stages.evaluate import run_evaluate
    from refit.stages.lib.config import load_recipe

    path, workdir = trained
    recipe = load_recipe(path)
    report = run_evaluate(recipe, workdir)
    (bench,) = report["benchmarks"].values()
    assert bench["items"] == 1 and set(bench["acc"]) == {
        "base",
        "base_stderr",
        "candidate",
        "candidate_stderr",
        "delta",
        "delta_stderr",
    }
    assert bench["longest_choice_tokens"] >= 1  # what the default metric is chosen by
    assert set(report["validation"]) == {"old", "new"}
    for source in report["validation"].values():
        assert source["docs"] > 0 and source["base_bits_per_byte"] > 0
        # the candidate was trained on these sources' other documents: its held-out loss falls
        assert source["candidate_loss_per_token"] < source["base_loss_per_token"]
    assert (workdir / "eval" / "_SUCCESS.json").exists()
    assert run_evaluate(recipe, workdir) == report  # done: reused


def test_cli_table_shows_points_with_standard_errors():
    from refit.flows.report import format_evaluation

    side = {
        "base": 0.5,
        "base_stderr": 0.02,
        "candidate": 0.6,
        "candidate_stderr": 0.03,
        "delta": 0.1,
        "delta_stderr": 0.01,
    }
    other = {**side, "delta": -0.02}
    scores = {
        "benchmarks": {
            "b": {"domain": "new", "items": 10, "metric": "acc_norm", "weight": 2.0, "acc": other, "acc_norm": side}
        },
        "average": side,
        "average_acc": other,
        "average_acc_norm": side,
    }
    validation = {
        "s": {
            "role": "legacy",
            "docs": 3,
            "base_loss_per_token": 2.0,
            "candidate_loss_per_token": 2.1,
            "base_bits_per_byte": 1.0,
            "candidate_bits_per_byte": 1.05,
        }
    }
    text = format_evaluation(scores, validation)
    assert "50.0 +- 2.0" in text and "60.0 +- 3.0" in text and "10.0 +- 1.0" in text and "1.000 -> 1.050" in text
    assert "-2.0 +- 1.0" in text and "acc_norm*" in text and "average acc_norm" in text  # both metrics, counted marked


def test_token_weighted_loss_comparison_with_ratio_standard_errors():
    from refit.stages.evaluate import _compare_loss

    tokens = np.array([10.0, 30.0, 20.0])
    base, candidate = np.array([20.0, 90.0, 50.0]), np.array([18.0, 84.0, 47.0])
    loss = _compare_loss(base, candidate, tokens)
    assert loss["base"] == pytest.approx(160 / 60) and loss["candidate"] == pytest.approx(149 / 60)
    assert loss["delta"] == pytest.approx(-11 / 60)
    residuals = (candidate - base) - loss["delta"] * tokens
    assert loss["delta_stderr"] == pytest.approx(np.sqrt((residuals**2).sum() / 6) / tokens.mean())
