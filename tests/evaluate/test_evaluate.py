"""evaluate: log-likelihood scoring as the harness does it, batched and deterministic;
validation loss and bits per byte; standard errors and paired differences."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import make_items, prepare, scoring_tasks, train_variant, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from refit.stages.core.scores import mean_stderr, paired_comparison
from refit.stages.evaluate.scorer import Scorer
from refit.stages.evaluate.stage import choice_metrics

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


def direct_logprobs(model_dir, items: list[dict]) -> list[np.ndarray]:
    """Per item, per choice: sum of log p(choice tokens | query), one unpadded sequence at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    scores = []
    for item in items:
        context = tokenizer(item["query"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in item["choices"]:
            whole = tokenizer(item["query"] + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], dim=-1)
            lls.append(float(sum(logprobs[i - 1, whole[i]] for i in range(len(context), len(whole)))))
        scores.append(np.array(lls))
    return scores


def direct_correctness(model_dir, items: list[dict]) -> dict[str, np.ndarray]:
    """Per item, 1.0 where the gold choice wins: by total log-likelihood (acc) and per character
    of the choice (acc_norm), from `direct_logprobs`."""
    acc, acc_norm = [], []
    for item, lls in zip(items, direct_logprobs(model_dir, items)):
        acc.append(float(np.argmax(lls) == item["gold"]))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in item["choices"]])) == item["gold"]))
    return {"acc": np.array(acc), "acc_norm": np.array(acc_norm)}


def test_choice_loglikelihoods_match_a_direct_computation_at_any_batch_size(tiny_model_dir):
    scorers = [Scorer(tiny_model_dir, tiny_model_dir, batch_size=b) for b in (1, 4)]
    requests = []
    for item in ITEMS:
        context = scorers[0].encode(item["query"])
        for choice in item["choices"]:
            requests.append((context, scorers[0].encode(item["query"] + choice)[len(context) :]))
    one, four = (np.array([lp.sum() for lp in s.continuation_logprobs(requests)]) for s in scorers)
    expected = np.concatenate(direct_logprobs(tiny_model_dir, ITEMS))
    assert one == pytest.approx(expected, abs=1e-4)
    assert four == pytest.approx(expected, abs=1e-4)  # right padding does not leak into scores


def test_acc_and_acc_norm_follow_the_harness_definitions(tiny_model_dir):
    scorer = Scorer(tiny_model_dir, tiny_model_dir, batch_size=8)
    scores = choice_metrics(ITEMS, scorer.choice_loglikelihoods(ITEMS))
    for n, (item, lls) in enumerate(zip(ITEMS, direct_logprobs(tiny_model_dir, ITEMS))):
        assert scores["acc"][n] == float(np.argmax(lls) == item["gold"])
        per_char = lls / np.array([len(c) for c in item["choices"]])
        assert scores["acc_norm"][n] == float(np.argmax(per_char) == item["gold"])
    again = choice_metrics(ITEMS, scorer.choice_loglikelihoods(ITEMS))
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
    compared = paired_comparison(base, candidate)
    assert compared["delta"] == pytest.approx(0.25)
    assert compared["delta_stderr"] == pytest.approx(np.std(candidate - base, ddof=1) / math.sqrt(8))


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_stage_reports_base_and_candidate_side_by_side(trained):
    """Three benchmarks of 16 items, each figure checked against the per-item correctness of both
    models computed here, one unpadded sequence at a time: means, standard errors (sample
    standard deviation / sqrt(n)), paired differences, and the weighted averages the audit uses."""
    from refit.stages.core.config import load_recipe
    from refit.stages.core.scores import judged_scores
    from refit.stages.evaluate.stage import run_evaluate
    from refit.stages.train import stage as train

    path, workdir = trained
    spec = yaml.safe_load(path.read_text())
    counted = {"a": ("new", "acc", 2.0), "b": ("new", None, 1.0), "c": ("legacy", "acc_norm", 0.5)}
    items = {name: make_items(16, seed) for seed, name in enumerate(counted, 1)}
    for name, (domain, metric, weight) in counted.items():
        write_jsonl(path.parent / f"{name}.jsonl", items[name])
    spec["evaluate"]["benchmarks"] = [
        {"name": name, "path": f"{name}.jsonl", "domain": domain, "metric": metric, "weight": weight}
        for name, (domain, metric, weight) in counted.items()
    ]
    path.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(path)
    report = run_evaluate(recipe, workdir)

    def stderr(values):
        return np.std(values, ddof=1) / np.sqrt(len(values))

    models = {"base": recipe.base_model.path, "candidate": train.final_model(workdir)}
    correct = {name: {m: direct_correctness(models[m], bench) for m in models} for name, bench in items.items()}
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    unpaired_differs = False
    assert list(report["benchmarks"]) == list(counted)
    for name, bench in report["benchmarks"].items():
        longest = max(
            len(tokenizer(c, add_special_tokens=False)["input_ids"]) for i in items[name] for c in i["choices"]
        )
        assert bench["items"] == 16 and bench["longest_choice_tokens"] == longest  # what picks the default metric
        for metric in ("acc", "acc_norm"):
            base, candidate = correct[name]["base"][metric], correct[name]["candidate"][metric]
            assert bench[metric] == pytest.approx(
                {
                    "base": base.mean(),
                    "base_stderr": stderr(base),
                    "candidate": candidate.mean(),
                    "candidate_stderr": stderr(candidate),
                    "delta": (candidate - base).mean(),
                    "delta_stderr": stderr(candidate - base),  # paired: the same items for both models
                }
            ), (name, metric)
            unpaired = np.sqrt(stderr(base) ** 2 + stderr(candidate) ** 2)
            unpaired_differs |= 0 < stderr(candidate - base) < 0.8 * unpaired
    assert unpaired_differs  # some items changed, and they tell a paired standard error from an unpaired one

    judged = judged_scores(recipe, report)
    chosen = {"a": "acc", "b": "acc_norm", "c": "acc_norm"}  # b: choices of several tokens
    assert {name: b["metric"] for name, b in judged["benchmarks"].items()} == chosen
    weights = {name: weight for name, (_, _, weight) in counted.items()}
    for key, metric_of in (("average", chosen), ("average_acc", dict.fromkeys(chosen, "acc"))):
        for side in ("base", "candidate", "delta"):
            figures = {name: report["benchmarks"][name][metric_of[name]] for name in chosen}
            total = sum(weights.values())
            mean = sum(weights[n] * f[side] for n, f in figures.items()) / total
            error = np.sqrt(sum((weights[n] * f[f"{side}_stderr"]) ** 2 for n, f in figures.items())) / total
            assert judged[key][side] == pytest.approx(mean) and judged[key][f"{side}_stderr"] == pytest.approx(error)
    assert set(report["validation"]) == {"old", "new"}
    for source in report["validation"].values():
        assert source["docs"] > 0 and source["base_bits_per_byte"] > 0
        # the candidate was trained on these sources' other documents: its held-out loss falls
        assert source["candidate_loss_per_token"] < source["base_loss_per_token"]
    assert "soup" not in report and set(report["scoring"]["models"]) == {"base", "candidate"}  # no ingredients
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
    text = format_evaluation(scores, validation)  # an audit written before gates.gain_estimator: equal weights
    assert "50.0 +- 2.0" in text and "60.0 +- 3.0" in text and "10.0 +- 1.0" in text and "1.000 -> 1.050" in text
    assert "-2.0 +- 1.0" in text and "acc_norm*" in text and "average acc_norm" in text  # both metrics, counted marked
    assert "average* (equal)" in text and "average (equal weight)" not in text
    text = format_evaluation({**scores, "estimator": "items", "average_equal": other}, validation)
    assert "average* (items)" in text and "average (equal weight)" in text


def test_token_weighted_loss_comparison_with_ratio_standard_errors():
    from refit.stages.evaluate.stage import _compare_loss

    tokens = np.array([10.0, 30.0, 20.0])
    base, candidate = np.array([20.0, 90.0, 50.0]), np.array([18.0, 84.0, 47.0])
    loss = _compare_loss(base, candidate, tokens)
    assert loss["base"] == pytest.approx(160 / 60) and loss["candidate"] == pytest.approx(149 / 60)
    assert loss["delta"] == pytest.approx(-11 / 60)
    residuals = (candidate - base) - loss["delta"] * tokens
    assert loss["delta_stderr"] == pytest.approx(np.sqrt((residuals**2).sum() / 6) / tokens.mean())


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_scoring_with_two_processes_equals_scoring_with_one(tiny_model_dir):
    from refit.stages.evaluate.scorer import ScoringSettings, choice_loglikelihoods, score_models

    tasks = scoring_tasks()
    models = {"base": tiny_model_dir}
    runs = {}
    for processes in (1, 2):
        settings = ScoringSettings("cpu", "float32", batch_size=4, num_processes=processes)
        runs[processes], summary = score_models(models, tiny_model_dir, tasks, settings)
        assert summary == {"base": {"tasks_scored": 2, "tasks_cached": 0}}
    one, two = runs[1]["base"], runs[2]["base"]
    items = tasks[0].inputs
    lls_one, lls_two = choice_loglikelihoods(one["bench"]), choice_loglikelihoods(two["bench"])
    assert len(lls_two) == len(items) and [len(x) for x in lls_two] == [len(i["choices"]) for i in items]
    for a, b in zip(lls_one, lls_two):  # every choice of every item, in the items' order
        assert b == pytest.approx(a, abs=1e-5)
    for metric in ("acc", "acc_norm"):
        assert np.array_equal(choice_metrics(items, lls_one)[metric], choice_metrics(items, lls_two)[metric])
    assert two["docs"]["tokens"].tolist() == one["docs"]["tokens"].tolist()
    assert two["docs"]["nll"] == pytest.approx(one["docs"]["nll"], abs=1e-5)


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_scoring_runs_in_as_many_processes_as_training_on_one_machine(tmp_path, tiny_model_dir, monkeypatch):
    """evaluate.num_processes unset: the processes training runs on one machine (its machines
    from the recipe or, as the train stage reads them, from Slurm's environment); set: its own."""
    import yaml

    from refit.stages.core.config import load_recipe
    from refit.stages.evaluate.stage import scoring_settings

    for name in ("SLURM_NNODES", "SLURM_NODEID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    path, _ = prepare(tmp_path, tiny_model_dir, run_data_stages=False, micro_batch_size=1)
    assert scoring_settings(load_recipe(path)).num_processes == 1  # the default train: one process
    assert scoring_settings(load_recipe(train_variant(path, "two.yaml", num_processes=2))).num_processes == 2
    machines = train_variant(path, "machines.yaml", num_processes=4, num_machines=2, main_process_ip="127.0.0.1")
    assert scoring_settings(load_recipe(machines)).num_processes == 2
    four = train_variant(path, "four.yaml", num_processes=4)
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert scoring_settings(load_recipe(four)).num_processes == 2  # 2 machines x 2 under Slurm
    explicit = yaml.safe_load(four.read_text())
    explicit["evaluate"]["num_processes"] = 3
    (tmp_path / "explicit.yaml").write_text(yaml.safe_dump(explicit))
    settings = scoring_settings(load_recipe(tmp_path / "explicit.yaml"))
    assert (settings.num_processes, settings.device, settings.devices) == (3, "cpu", None)


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_base_scores_are_cached_across_runs_and_invalidated_when_the_base_changes(trained, tmp_path):
    import shutil

    from refit.stages.core.config import load_recipe
    from refit.stages.evaluate.stage import run_evaluate

    path, workdir = trained
    recipe = load_recipe(path)
    base = tmp_path / "base-copy"  # the session's tiny model stays as it is
    shutil.copytree(recipe.base_model.path, base)
    recipe = recipe.model_copy(update={"base_model": recipe.base_model.model_copy(update={"path": str(base)})})

    first = run_evaluate(recipe, workdir)
    assert first["base_cached"] is False and first["scoring"]["device"] == "cpu"
    assert first["scoring"]["models"] == {
        # one benchmark, two sources' validation documents, CrowS-Pairs and BBQ
        "base": {"tasks_scored": 5, "tasks_cached": 0},
        "candidate": {"tasks_scored": 5, "tasks_cached": 0},
    }
    cache = workdir.parent / ".refit-cache"  # beside the workdir, where sweep variants and nightly runs find it
    assert first["scoring"]["cache_dir"] == str(cache) and len(list((cache / "scores").glob("*.npz"))) == 5

    def age_cache(days: float) -> None:  # as if the cached scores were last used days ago
        then = time.time() - days * 86400
        for entry in (cache / "scores").glob("*.npz"):
            os.utime(entry, (then, then))

    age_cache(recipe.evaluate.cache_max_age_days + 1)
    second = run_evaluate(recipe, workdir, force=True)  # the next night, or another variant of the same base
    assert second["base_cached"] is True
    assert second["scoring"]["cache_entries_pruned"] == 0  # read this run, so kept
    assert second["scoring"]["models"]["base"] == {"tasks_scored": 0, "tasks_cached": 5}  # the base was not scored
    assert second["scoring"]["models"]["candidate"] == {"tasks_scored": 5, "tasks_cached": 0}
    assert second["benchmarks"] == first["benchmarks"] and second["validation"] == first["validation"]

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # another base: sharper predictions, other losses
    model.save_pretrained(base)
    age_cache(recipe.evaluate.cache_max_age_days + 1)
    third = run_evaluate(recipe, workdir, force=True)
    assert third["base_cached"] is False and third["scoring"]["models"]["base"]["tasks_scored"] == 5
    # the old base's scores were unused for longer than evaluate.cache_max_age_days: removed
    assert third["scoring"]["cache_entries_pruned"] == 5 and len(list((cache / "scores").glob("*.npz"))) == 5
    assert third["scoring"]["base_sha256"] != first["scoring"]["base_sha256"]
    for name, source in third["validation"].items():
        assert source["base_loss_per_token"] != first["validation"][name]["base_loss_per_token"]
        assert source["candidate_loss_per_token"] == first["validation"][name]["candidate_loss_per_token"]


def test_a_file_is_hashed_once_per_size_and_mtime(tmp_path):
    import hashlib
    import os

    from refit.stages.core.file_hashes import directory_sha256, memoized_sha256

    weights, memo = tmp_path / "model" / "weights.bin", tmp_path / "memo"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 1000)
    original = memoized_sha256(weights, memo)
    assert original == hashlib.sha256(b"a" * 1000).hexdigest()
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size, and the old mtime put back: the memo answers, the file is not read
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert memoized_sha256(weights, memo) == original
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: read again
    assert memoized_sha256(weights, memo) == hashlib.sha256(b"b" * 1000).hexdigest()
    folder_digest = directory_sha256([weights.parent, weights.parent], memo)
    (weights.parent / "config.json").write_text("{}")
    assert directory_sha256([weights.parent], memo) != folder_digest


def test_device_and_precision_follow_the_machine_unless_set(tiny_model_dir):
    from refit.stages.core.config import EvaluateSpec
    from refit.stages.evaluate.scorer import ScoringSettings

    auto = ScoringSettings.resolve(EvaluateSpec())
    if torch.cuda.is_available():
        assert auto.device == "cuda" and auto.dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    else:
        assert (auto.device, auto.dtype) == ("cpu", "float32")
        with pytest.raises(ValueError, match="evaluate.device is cuda"):
            ScoringSettings.resolve(EvaluateSpec(device="cuda"))
    bf16 = ScoringSettings.resolve(EvaluateSpec(device="cpu", precision="bf16"))
    assert (bf16.device, bf16.dtype) == ("cpu", "bfloat16")
    fp32 = Scorer(tiny_model_dir, tiny_model_dir, batch_size=4)
    half = Scorer(tiny_model_dir, tiny_model_dir, batch_size=4, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    exact, rounded = (np.concatenate(s.choice_loglikelihoods(ITEMS)) for s in (fp32, half))
    assert rounded == pytest.approx(exact, rel=0.03)  # bf16 weights and activations, fp32 softmax


@pytest.mark.gpu
def test_scoring_on_the_gpu_in_bf16_agrees_with_the_cpu(tiny_model_dir):
    from refit.stages.evaluate.scorer import ScoringSettings, score_models

    tasks = scoring_tasks()
    results = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        settings = ScoringSettings(device, dtype, batch_size=4)
        results[device] = score_models({"m": tiny_model_dir}, tiny_model_dir, tasks, settings)[0]["m"]
    for key, scores in results["cpu"].items():
        for name, values in scores.items():
            assert results["cuda"][key][name] == pytest.approx(values, rel=0.03)
