"""The lm-eval backend: lm-evaluation-harness, run offline on the same checkpoint through
the task definitions Refit writes, agrees with Refit's own scorer item by item."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import yaml
from conftest import make_items

from refit.stages.core.config import BenchmarkSpec
from refit.stages.core.scores import mean_stderr
from refit.stages.evaluate import lm_eval_backend
from refit.stages.evaluate.scorer import Scorer, ScoringSettings, choice_loglikelihoods
from refit.stages.evaluate.stage import choice_metrics

os.environ["HF_DATASETS_OFFLINE"] = "1"  # the harness loads the benchmark file through `datasets`, offline


@pytest.fixture()
def bench(tmp_path) -> BenchmarkSpec:
    path = tmp_path / "tiny_mc.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in make_items()))
    return BenchmarkSpec(name="tiny_mc", path=str(path), domain="new")


def test_task_definition_scores_the_same_tokens(tmp_path, bench):
    folder = lm_eval_backend.write_tasks([bench], tmp_path / "tasks")
    task = yaml.safe_load((folder / "refit_tiny_mc.yaml").read_text())
    assert task["dataset_path"] == "json" and task["dataset_kwargs"] == {"data_files": {"test": bench.path}}
    assert task["output_type"] == "multiple_choice" and task["target_delimiter"] == ""
    assert (task["doc_to_text"], task["doc_to_choice"], task["doc_to_target"]) == ("query", "choices", "gold")


def harness_model(model_dir, task_dir, batch_size: int) -> lm_eval_backend.HarnessModel:
    """The model as the harness runs it beside Refit's scorer on the CPU in float32."""
    return lm_eval_backend.HarnessModel.like(
        ScoringSettings("cpu", "float32", batch_size), model_dir, model_dir, task_dir
    )


def assert_backends_agree(model_dir, bench, task_dir):
    items = [json.loads(line) for line in open(bench.path)]
    scorer = Scorer(model_dir, model_dir, batch_size=4)
    refit_lls = scorer.choice_loglikelihoods(items)
    refit = choice_metrics(items, refit_lls)
    harness = lm_eval_backend.score_benchmarks(harness_model(model_dir, task_dir, batch_size=4), [bench])["tiny_mc"]

    for ours, theirs in zip(refit_lls, harness["loglikelihoods"]):  # every choice of every item
        assert ours == pytest.approx(theirs, abs=1e-4)
    assert np.array_equal(refit["acc"], harness["acc"])
    assert np.array_equal(refit["acc_norm"], harness["acc_norm"])
    assert not np.array_equal(refit["acc"], refit["acc_norm"])  # the two metrics are told apart
    reported = harness["reported"]  # the harness's own aggregates: Refit's mean and standard error
    for metric in ("acc", "acc_norm"):
        mean, stderr = mean_stderr(refit[metric])
        assert reported[metric] == pytest.approx(mean) and reported[f"{metric}_stderr"] == pytest.approx(stderr)
    assert 0 < reported["acc_stderr"] < 1 / math.sqrt(len(items))
    return refit_lls


def test_both_backends_give_the_same_scores_on_the_same_model(tmp_path, tiny_model_dir, bench):
    assert_backends_agree(tiny_model_dir, bench, tmp_path / "tasks")


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_a_tokenizer_that_adds_bos_gets_it_on_each_query_in_both_backends(tmp_path, tiny_model_dir, bench):
    """lm-evaluation-harness's default is the tokenizer's own special tokens: a BOS before the
    query for tokenizers that add one (Llama's do). Refit follows it; prefix_eos adds an EOS."""
    import shutil

    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    with_bos = tmp_path / "model-bos"
    shutil.copytree(tiny_model_dir, with_bos)
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token
    tokenizer = Tokenizer.from_file(str(with_bos / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    tokenizer.save(str(with_bos / "tokenizer.json"))
    encode = AutoTokenizer.from_pretrained(with_bos)
    assert encode("SELECT name")["input_ids"][0] == encode.eos_token_id  # it adds one
    with_prefix = assert_backends_agree(with_bos, bench, tmp_path / "tasks")
    items = [json.loads(line) for line in open(bench.path)]
    plain = Scorer(tiny_model_dir, tiny_model_dir, batch_size=4)
    assert not np.allclose(plain.choice_loglikelihoods(items)[0], with_prefix[0])  # the BOS changed the scores
    prefixed = Scorer(tiny_model_dir, tiny_model_dir, batch_size=4, prefix_eos=True)  # evaluate.prefix_eos
    for ours, bos_first in zip(prefixed.choice_loglikelihoods(items), with_prefix):
        assert ours == pytest.approx(bos_first, abs=1e-4)  # here BOS is EOS: the same tokens


def test_both_backends_give_the_same_percent_stereotype_on_crows_pairs(tmp_path, tiny_model_dir):
    from refit.stages.core.config import SafetySpec
    from refit.stages.evaluate import safety_probes as safety

    scorer = Scorer(tiny_model_dir, tiny_model_dir, batch_size=8)
    spec = SafetySpec(probes=["crows_pairs"], crows_pairs_size=60, generation=False)
    pairs = safety.fitting_pairs(scorer.tokenizer, safety.Probes(spec).crows_pairs, scorer.max_len)
    both = np.array(choice_loglikelihoods(scorer.score(safety.crows_pairs_task(pairs, scorer.tokenizer))))
    ours = both[:, 0], both[:, 1]
    theirs = lm_eval_backend.score_crows_pairs(harness_model(tiny_model_dir, tmp_path / "tasks", batch_size=8), pairs)
    for mine, harness in zip(ours, theirs):  # sent_more, then sent_less: every sentence
        assert mine == pytest.approx(harness, abs=1e-4)
    assert np.array_equal(ours[0] > ours[1], theirs[0] > theirs[1])  # the same pairs count as stereotyped
    assert len(pairs) > 40 and 0 < np.mean(ours[0] > ours[1]) < 1
    task = yaml.safe_load((tmp_path / "tasks" / "refit_crows_pairs_english.yaml").read_text())
    assert task["include"].endswith("crows_pairs/crows_pairs_english.yaml")  # the harness's own definition


def test_missing_harness_is_a_clear_error(monkeypatch, tmp_path, bench):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: import fails
    with pytest.raises(ImportError, match=r"pip install 'refit\[lm-eval\]'"):
        lm_eval_backend.score_benchmarks(
            lm_eval_backend.HarnessModel(tmp_path, tmp_path, tmp_path / "tasks", 4), [bench]
        )


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_stage_backend_is_recorded_and_part_of_the_fingerprint(trained):
    from refit.stages.core.config import load_recipe
    from refit.stages.core.markers import read_marker
    from refit.stages.evaluate.stage import run_evaluate

    path, workdir = trained
    recipe = load_recipe(path)
    ours = run_evaluate(recipe, workdir)
    ours_marker = read_marker(workdir / "eval")
    theirs = run_evaluate(recipe, workdir, backend="lm-eval")
    assert (ours["backend"], theirs["backend"]) == ("refit", "lm-eval")
    assert read_marker(workdir / "eval")["fingerprint"] != ours_marker["fingerprint"]  # switching backends reruns
    assert json.loads((workdir / "eval" / "report.json").read_text())["backend"] == "lm-eval"
    assert (workdir / "eval" / "lm_eval_tasks" / "refit_b.yaml").is_file()  # what the harness ran, kept
    for name, bench in ours["benchmarks"].items():
        for metric in ("acc", "acc_norm"):
            assert theirs["benchmarks"][name][metric] == pytest.approx(bench[metric])
    assert (
        theirs["validation"] and theirs["validation"] == ours["validation"]
    )  # validation loss: Refit's own either way
    crows = {name: report["safety"]["crows_pairs"] for name, report in (("refit", ours), ("lm-eval", theirs))}
    assert crows["lm-eval"]["backend"] == "lm-eval" and crows["lm-eval"]["pairs"] == crows["refit"]["pairs"]
    assert crows["lm-eval"]["percent_stereotype"] == pytest.approx(crows["refit"]["percent_stereotype"])
    assert (workdir / "eval" / "lm_eval_tasks" / "refit_crows_pairs_english.yaml").is_file()
    assert run_evaluate(recipe, workdir, backend="lm-eval") == theirs  # done: reused
    with pytest.raises(ValueError, match="unknown evaluation backend"):
        run_evaluate(recipe, workdir, backend="lm_eval")
