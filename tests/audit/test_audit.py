"""audit: noise-aware gates, all failures reported together, contamination named,
a candidate made worse on purpose refused with every reason, and the report itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BASE_RECIPE, arrow_peaks, write_jsonl, write_recipe
from safetensors.torch import load_file, save_file

from refit.stages.audit.gates import (
    accuracy_gates,
    health_gate,
    lineage_gate,
    loss_gates,
    loss_spikes,
    validation_warnings,
)
from refit.stages.audit.stage import AuditFailed, cost_report, lineage, run_audit
from refit.stages.core.config import load_recipe
from refit.stages.core.scores import (
    chosen_metric,
    detectable_differences,
    judged_scores,
    paired_comparison,
    underpowered,
)
from refit.stages.evaluate.stage import run_evaluate
from refit.stages.mix.manifest import MANIFEST_VERSION, Manifest, ScheduleSummary, Shard, SourcePlan


def side(base, candidate, delta_stderr, stderr=0.01):
    return {
        "base": base,
        "base_stderr": stderr,
        "candidate": candidate,
        "candidate_stderr": stderr,
        "delta": candidate - base,
        "delta_stderr": delta_stderr,
    }


def evaluation(benches, validation, longest_choice_tokens=3):
    """An evaluate report: each benchmark's figures given for both metrics alike."""
    return {
        "benchmarks": {
            k: {"domain": "new", "items": 100, "longest_choice_tokens": longest_choice_tokens, "acc": v, "acc_norm": v}
            for k, v in benches.items()
        },
        "validation": validation,
    }


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    for name in ("old", "new", "qa"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.jsonl").write_text("{}\n")
    return load_recipe(write_recipe(tmp_path, BASE_RECIPE))


def test_improvements_must_clear_the_noise_and_regressions_must_exceed_it(recipe):
    # +3 points with stderr 1: clears 0 by 2 sigma. +1.5 with stderr 1: within noise, not shown.
    assert accuracy_gates(recipe, evaluation({"b": side(0.3, 0.33, 0.01)}, {}), None)[0]["passed"]
    assert not accuracy_gates(recipe, evaluation({"b": side(0.3, 0.315, 0.01)}, {}), None)[0]["passed"]
    # a benchmark down 3 points with stderr 1 (2 sigma reaches -1) does not prove a drop beyond 2 points...
    gates = accuracy_gates(recipe, evaluation({"b": side(0.5, 0.47, 0.01)}, {}), None)
    assert gates[1]["name"] == "benchmark_regression:b" and gates[1]["passed"]
    # ...down 6 points with stderr 1 does
    gates = accuracy_gates(recipe, evaluation({"b": side(0.5, 0.44, 0.01)}, {}), None)
    assert not gates[1]["passed"] and "beyond 2 standard errors" in gates[1]["reason"]
    legacy = {"role": "legacy", "loss": side(2.0, 2.2, 0.02)}  # +10%, stderr 1%: forgetting shown
    new = {"role": "new", "loss": side(4.0, 3.99, 0.02)}  # down 0.01, stderr 0.02: learning not shown
    gates = {g["name"]: g for g in loss_gates(recipe, evaluation({}, {"old": legacy, "new": new}))}
    assert not gates["forgetting:old"]["passed"] and gates["forgetting:old"]["value"] == pytest.approx(0.10)
    assert not gates["new_domain_learned:new"]["passed"]
    # the previous version is compared on this run's metric: its acc_norm, not its acc
    previous = evaluation({"b": side(0.3, 0.40, 0.01)}, {})
    previous["benchmarks"]["b"]["acc"] = side(0.3, 0.30, 0.01)
    gates = accuracy_gates(recipe, evaluation({"b": side(0.3, 0.35, 0.01)}, {}), previous)
    assert gates[1]["name"] == "above_previous_version" and not gates[1]["passed"] and gates[1]["threshold"] == 0.40


def per_item(items: int, right: int, up: int, down: int) -> tuple[np.ndarray, np.ndarray]:
    """Base and candidate correctness per item: `right` of `items` right for the base; the
    candidate gets `up` of the base's wrong ones right and `down` of its right ones wrong."""
    base = np.zeros(items)
    base[:right] = 1
    candidate = base.copy()
    candidate[right : right + up] = 1
    candidate[:down] = 0
    return base, candidate


def planted(up_acc: int, down_acc: int, up_norm: int, down_norm: int, domain="new", items=1000, right=350, longest=3):
    return {
        "domain": domain,
        "items": items,
        "longest_choice_tokens": longest,
        "acc": paired_comparison(*per_item(items, right, up_acc, down_acc)),
        "acc_norm": paired_comparison(*per_item(items, right, up_norm, down_norm)),
    }


def test_acc_norm_learning_on_the_new_cloze_passes_the_gain_gate_naming_what_drove_it(tmp_path, recipe):
    """The issue's run: on the new-domain cloze benchmark acc_norm rises 10 points and acc 1.8,
    two 65-item QA sets stay at chance, the legacy cloze loses half a point."""
    report = {
        "benchmarks": {
            "sql_cloze": planted(60, 42, 150, 50),
            "sql_qa": planted(1, 1, 1, 1, items=65, right=16),
            "sql_commands": planted(1, 1, 1, 1, items=65, right=16),
            "python_cloze": planted(7, 10, 7, 10, domain="legacy", items=750, right=300),
        },
        "validation": {},
    }
    benchmarks = [{"name": name, "path": "data/old.jsonl", "domain": "new"} for name in report["benchmarks"]]
    equal = {**BASE_RECIPE, "gates": {"gain_estimator": "equal"}}  # the figures below are the macro average's
    by_default = load_recipe(
        write_recipe(tmp_path, {**equal, "evaluate": {"benchmarks": benchmarks}}), check_files=False
    )
    gain = accuracy_gates(by_default, report, None)[0]
    assert gain["passed"] and gain["value"] == pytest.approx((0.10 - 0.004) / 4)
    assert gain["drivers"] == ["sql_cloze"] and "driven by sql_cloze;" in gain["reason"]
    assert "sql_cloze acc_norm x1 1000 items, 25% of the average (+2.5)" in gain["reason"]
    # the same run counted by unnormalised accuracy: +0.35 points on average, within noise
    as_acc = [{**b, "metric": "acc"} for b in benchmarks]
    gain = accuracy_gates(
        load_recipe(write_recipe(tmp_path, {**equal, "evaluate": {"benchmarks": as_acc}}), check_files=False),
        report,
        None,
    )[0]
    assert not gain["passed"] and gain["value"] == pytest.approx((0.018 - 0.004) / 4)
    # weights: the QA sets at chance not counted in the average (still gated for regression)
    weighted = [{**b, "weight": 0} if b["name"] in ("sql_qa", "sql_commands") else b for b in benchmarks]
    gates = accuracy_gates(
        load_recipe(write_recipe(tmp_path, {**equal, "evaluate": {"benchmarks": weighted}}), check_files=False),
        report,
        None,
    )
    assert gates[0]["value"] == pytest.approx((0.10 - 0.004) / 2) and gates[0]["passed"]
    assert {g["name"] for g in gates[1:]} == {f"benchmark_regression:{n}" for n in report["benchmarks"]}
    scores = judged_scores(by_default, report)
    assert scores["average_acc"]["delta"] == pytest.approx((0.018 - 0.004) / 4)  # both metrics shown
    assert scores["benchmarks"]["sql_cloze"]["metric_reason"] == "default: choices of up to 3 tokens"


def _issue_run(large: dict[str, tuple[int, int]], small: dict[str, tuple[int, int]]) -> dict:
    """The shape of a real run (the gain gate's issue): two large cloze benchmarks and two QA sets
    of 60-70 items at chance; (up, down) per benchmark: items the candidate gets newly right and
    newly wrong, the same for both metrics."""
    shapes = {"pg_cloze": (1000, 322, "new"), "py_cloze": (901, 325, "legacy"), "pg_qa": (63, 15, "new")}
    shapes["py_qa"] = (71, 18, "legacy")
    moves = {**large, **small}
    return {
        "benchmarks": {
            name: planted(*moves[name], *moves[name], domain=domain, items=items, right=right)
            for name, (items, right, domain) in shapes.items()
        },
        "validation": {},
    }


def _with(tmp_path, report: dict, **gates):
    benchmarks = [{"name": n, "path": "data/old.jsonl", "domain": b["domain"]} for n, b in report["benchmarks"].items()]
    spec = {**BASE_RECIPE, "gates": gates, "evaluate": {"benchmarks": benchmarks}}
    return load_recipe(write_recipe(tmp_path, spec), check_files=False)  # gates read no file


# the issue's table: pg_cloze +8.3 +- 1.3, pg_qa +3.2 +- 7.5, py_cloze +4.4 +- 1.0, py_qa -2.8 +- 3.5 (points)
ISSUE = {"pg_cloze": (130, 47), "py_cloze": (62, 22)}, {"pg_qa": (12, 10), "py_qa": (2, 4)}


def test_two_large_benchmarks_improving_beyond_noise_pass_the_default_gain_gate(tmp_path):
    report = _issue_run(*ISSUE)
    scores = judged_scores(_with(tmp_path, report), report)
    assert scores["benchmarks"]["pg_cloze"]["acc_norm"]["delta_stderr"] == pytest.approx(0.013, abs=0.001)
    assert scores["benchmarks"]["pg_qa"]["acc_norm"]["delta_stderr"] == pytest.approx(0.075, abs=0.003)
    gain = accuracy_gates(_with(tmp_path, report), report, None)[0]
    assert gain["passed"] and gain["estimator"] == "items"
    assert gain["value"] == pytest.approx((83 + 40 + 2 - 2) / (1000 + 901 + 63 + 71))  # every item counted once
    assert "items-weighted average accuracy (gates.gain_estimator: items)" in gain["reason"]
    assert "driven by pg_cloze, py_cloze" in gain["reason"]
    # the equal-weight average is reported beside it: +3.3 +- 2.1 points, no power at 2 standard errors
    assert gain["equal_weight"]["delta"] == pytest.approx(0.033, abs=0.001)
    assert gain["equal_weight"]["delta_stderr"] == pytest.approx(0.021, abs=0.001)
    assert "equal-weight average 0." in gain["reason"]
    assert accuracy_gates(_with(tmp_path, report, gain_estimator="precision"), report, None)[0]["passed"]


def test_a_failing_gain_gate_names_the_benchmarks_behind_its_noise_and_what_would_decide(tmp_path):
    report = _issue_run(*ISSUE)
    gain = accuracy_gates(_with(tmp_path, report, gain_estimator="equal"), report, None)[0]
    assert not gain["passed"]
    assert "its standard error comes mostly from pg_qa (63 items, 79% of the variance)" in gain["reason"]
    decide = gain["reason"].split("what would let the data decide: ")[1]
    assert decide.startswith("gates.gain_estimator: items (") and "gates.gain_estimator: precision (" in decide
    assert "weight 0 for pg_qa (" in decide and decide.endswith("x the items of every benchmark")


def test_small_benchmarks_moving_by_noise_alone_fail_under_every_estimator(tmp_path):
    report = _issue_run({"pg_cloze": (88, 88), "py_cloze": (42, 42)}, ISSUE[1])
    for estimator in ("items", "precision", "equal"):
        gain = accuracy_gates(_with(tmp_path, report, gain_estimator=estimator), report, None)[0]
        assert not gain["passed"], (estimator, gain["reason"])
        assert gain["drivers"] == [] and "no benchmark moved beyond noise on its own" in gain["reason"]


def test_a_regression_on_a_large_benchmark_fails_whatever_the_average_does(tmp_path):
    report = _issue_run({"pg_cloze": (130, 47), "py_cloze": (22, 62)}, ISSUE[1])  # py_cloze -4.4 +- 1.0
    gates = {g["name"]: g for g in accuracy_gates(_with(tmp_path, report), report, None)}
    assert gates["average_accuracy_gain"]["passed"]  # the average still rises beyond noise
    assert not gates["benchmark_regression:py_cloze"]["passed"]


def test_the_detectable_difference_of_each_benchmark_and_of_the_average_before_a_run(tmp_path, capsys):
    from refit.flows.cli import main as refit

    item = {"query": "q", "choices": [" a", " b"], "gold": 0}
    write_jsonl(tmp_path / "big.jsonl", [{"id": i, **item} for i in range(1000)])
    write_jsonl(tmp_path / "small.jsonl", [{"id": i, **item} for i in range(63)])
    for name in ("base", "data"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "base" / "config.json").write_text("{}")
    for name in ("old", "qa"):
        (tmp_path / "data" / f"{name}.jsonl").write_text("{}\n")
    benchmarks = [{"name": n, "path": f"{n}.jsonl", "domain": "new"} for n in ("big", "small")]
    path = write_recipe(tmp_path, {**BASE_RECIPE, "evaluate": {"benchmarks": benchmarks}})
    power = detectable_differences(load_recipe(path))
    assert power["benchmarks"]["small"]["detectable"] == pytest.approx(2 * (0.5 / 63) ** 0.5)
    assert power["average"]["stderr"] == pytest.approx((0.5 * 1063) ** 0.5 / 1063)  # items-weighted: all items
    (warning,) = underpowered(load_recipe(path), power)
    assert warning.startswith("benchmark small: 63 items detect only differences beyond 17.8 points")
    assert refit(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "small" in out and "17.8p" in out and "average (items)" in out and f"warning: {warning}" in out


def test_default_metric_follows_the_choices_length_in_tokens():
    assert chosen_metric(None, 1) == ("acc", "default: every choice is one token")
    assert chosen_metric(None, 4)[0] == "acc_norm" and chosen_metric("acc", 4) == ("acc", "set by the recipe")


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_worse_candidate_fails_with_every_reason_and_a_readable_report(trained):
    path, workdir = trained
    weights_file = workdir / "train" / "final" / "model.safetensors"
    weights = load_file(weights_file)
    generator = torch.Generator().manual_seed(0)
    save_file(
        {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in weights.items()},
        weights_file,
        metadata={"format": "pt"},
    )
    recipe = load_recipe(path)
    run_evaluate(recipe, workdir)
    with pytest.raises(AuditFailed) as failed:
        run_audit(recipe, workdir)
    report = json.loads((workdir / "audit" / "report.json").read_text())
    failed_names = {g["name"] for g in report["gates"] if not g["passed"]}
    assert {"forgetting:old", "new_domain_learned:new", "average_accuracy_gain"} <= failed_names
    assert all(reason in str(failed.value) for reason in report["failed"])  # every failure, not just the first
    markdown = (workdir / "audit" / "report.md").read_text()
    assert "FAILED" in markdown and "| forgetting:old | **no** |" in markdown
    for png in ("training.png", "accuracy.png", "validation_loss.png"):
        assert (workdir / "audit" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in markdown
    assert report["cost"]["flops"] == 6 * report["cost"]["parameters"] * report["cost"]["tokens"]
    assert report["lineage"]["shards_verified"] and report["lineage"]["manifest_sha256"]
    assert "soup" not in report and "soup" not in report["lineage"] and "soup" not in report["cost"]  # no soup: none
    assert "## Soup" not in markdown
    first, last = (report["train"]["validation"]["losses"][i]["val_loss"] for i in (0, -1))  # scored in training
    assert f"validation loss at checkpoints {first:.3f} (step 4) -> {last:.3f} (step 20) on " in markdown


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)  # the trained run the other audit tests copy
def test_planted_contaminated_item_fails_the_gate_naming_it(trained):
    path, workdir = trained
    recipe = load_recipe(path)
    curated = workdir / "curate" / "new"
    import pyarrow.parquet as pq

    text = pq.read_table(sorted(curated.glob("train-*.parquet"))[0])["text"][0].as_py()
    words = text.split()
    bench = path.parent / "bench.jsonl"
    bench.write_text(
        bench.read_text()
        + json.dumps(
            {"id": "planted", "query": " ".join(words[:14]), "choices": [" " + words[14], " nothing"], "gold": 0}
        )
        + "\n"
    )
    recipe = load_recipe(path)  # the benchmark file changed after curation: the audit checks what was trained on
    run_evaluate(recipe, workdir, force=True)
    with pytest.raises(AuditFailed, match=r"contaminat"):
        run_audit(recipe, workdir)
    (gate,) = [
        g for g in json.loads((workdir / "audit" / "report.json").read_text())["gates"] if g["name"] == "contamination"
    ]
    assert not gate["passed"] and gate["value"] == 1 and "b:planted" in gate["reason"]


def _metrics(losses: list[float]) -> list[dict]:
    return [{"step": step, "loss": loss} for step, loss in enumerate(losses)]


def test_a_loss_spike_must_come_back_within_the_recovery_window(recipe):
    steady = [3.0 - 0.01 * i for i in range(30)]
    recovered = steady[:25] + [30.0] + steady[25:]  # back under the running median at the next step
    unrecovered = steady[:25] + [30.0] + [25.0] * 12  # never back within RECOVERY_STEPS
    assert health_gate(recipe, [_metrics(steady)])["passed"]
    assert health_gate(recipe, [_metrics(recovered)])["passed"]
    failed = health_gate(recipe, [_metrics(unrecovered)])
    assert not failed["passed"] and failed["value"] >= 1 and "unrecovered loss spikes at steps [25" in failed["reason"]
    assert loss_spikes(recipe, _metrics(recovered)) == [{"step": 25, "loss": 30.0, "recovered": True}]
    assert loss_spikes(recipe, _metrics(unrecovered))[0] == {"step": 25, "loss": 30.0, "recovered": False}
    nan = health_gate(recipe, [_metrics(steady[:10] + [float("nan")])])
    assert not nan["passed"] and "non-finite loss" in nan["reason"]
    # with a soup every ingredient's log counts, named: here ingredient 1's anneal never recovers
    souped = health_gate(recipe, [_metrics(steady), _metrics(unrecovered), _metrics(recovered)])
    assert not souped["passed"] and souped["reason"].startswith("ingredient 1: unrecovered loss spikes at steps [25")


def test_the_cost_counts_the_optimizer_warmup_tokens(recipe):
    """The warm-up's steps at LR 0 run forward and backward passes like any step: their tokens
    count in the FLOPs, the throughput and against retraining (its seconds are in the wall time)."""
    trained = {"seconds": 50.0, "processes": 2, "tokens": 4000, "optimizer_warmup_tokens": 1000}
    cost = cost_report(recipe, trained, evaluation({}, {}), parameters=10)
    assert (cost["tokens"], cost["optimizer_warmup_tokens"], cost["flops"]) == (5000, 1000, 6 * 10 * 5000)
    assert cost["tokens_per_second"] == 100 and cost["device_hours"] == 100 / 3600


def test_lineage_fails_on_a_shard_that_does_not_match_its_manifest_or_a_missing_training(recipe, tmp_path):
    workdir = tmp_path / "wd"
    (workdir / "tokenize" / "s").mkdir(parents=True)
    (workdir / "tokenize" / "s" / "shard-00000.arrow").write_bytes(b"tampered after mix")
    shard = Shard(path="tokenize/s/shard-00000.arrow", rows=1, sha256="0" * 64)
    source = SourcePlan(role="new", rows=1, tokens=8, shards=[shard], drawn_sequences=1, drawn_tokens=8, epochs=1.0)
    schedule = ScheduleSummary(max_lr=1e-4, min_lr_ratio=0.01, warmup_steps=0, decay="cosine", wsd_decay_steps=1)
    manifest = Manifest(
        version=MANIFEST_VERSION,
        tokenizer_sha256="t" * 64,
        dtype="uint16",
        eos_id=0,
        seq_len=8,
        sequences_per_step=1,
        tokens_per_step=8,
        total_steps=1,
        total_tokens=8,
        seed=0,
        schedule=schedule,
        phases=[],
        sources={"s": source},
        warnings=[],
    ).sealed()
    record = lineage(recipe, workdir, manifest)
    assert record["shards_verified"] is False and record["train_fingerprint"] is None  # no finished training
    gate = lineage_gate(record)
    assert (
        not gate["passed"]
        and "train_fingerprint" in gate["reason"]
        and "shards match the manifest: False" in (gate["reason"])
    )


def test_validation_sets_too_small_for_the_loss_gates_are_warned_about(recipe):
    small = {"role": "legacy", "docs": 8, "held_out_docs": 8, "tokens": 42_000, "loss": side(5.0, 5.1, 0.08)}
    large = {"role": "new", "docs": 200, "held_out_docs": 900, "tokens": 150_000, "loss": side(5.0, 4.0, 0.01)}
    (warning,) = validation_warnings(recipe, evaluation({}, {"python": small, "postgres": large}))
    assert warning.startswith("validation set python (legacy, 8 documents): 42,000 tokens, fewer than")
    assert "3.2% of the loss, over half the 5% forgetting limit" in warning
    large["tokens"] = 50_000
    (warning,) = validation_warnings(recipe, evaluation({}, {"p": large}))
    assert "of 900 held out: evaluate.validation_docs caps it" in warning


def test_contamination_gate_memory_does_not_grow_with_the_curated_text(tmp_path, tiny_tokenizer_dir):
    small, large = arrow_peaks("contamination", tmp_path, tiny_tokenizer_dir, (4, 32))
    assert large - small < 8 * 2**20, f"Arrow peak {small / 2**20:.1f} MiB at 4 MiB of text, {large / 2**20:.1f} at 32"
