"""The soup evaluated beside its ingredients (#26): one tiny run of 3 anneal ingredients
(uniform soup) through train, evaluate, audit and publish. Evaluate scores each ingredient on
the same items and documents as the soup (not the safety probes), and its `soup` section
compares the soup with each ingredient and with their per-item mean, paired: every figure is
recomputed here from per-item scores; the best ingredient is the one with the highest counted
average. The audit gates the soup and shows the comparison, every ingredient's weights in the
lineage and the cost of the shared prefix once and each anneal once; the model card lists the
ingredients and the averaging rule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BASE_RECIPE, LENIENT, TEXT, make_items, prepare, write_jsonl, write_recipe

from refit.stages.audit.soup import judged_soup
from refit.stages.audit.stage import run_audit
from refit.stages.core.config import load_recipe
from refit.stages.core.markers import file_sha256
from refit.stages.core.scores import METRICS, judged_scores
from refit.stages.curate.stage import run_curate, validation_texts
from refit.stages.evaluate.scorer import Scorer
from refit.stages.evaluate.stage import choice_metrics, run_evaluate
from refit.stages.mix.stage import run_mix
from refit.stages.publish.stage import Registry, run_publish
from refit.stages.tokenize.stage import run_tokenize
from refit.stages.train.stage import final_model, ingredient_models, run_train


def on_the_souped_run(test):
    """A test of the tiny soup run (`souped`): slow, on the Llama model."""
    return pytest.mark.slow(pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)(test))


# two benchmarks in the tiny tokenizer's words: "a" counts acc (weight 2), "c" the default (acc_norm: choices of
# several tokens); a's choices are single words, close enough in likelihood for ingredients to disagree on some
BENCHMARKS = {"a": ("new", "acc", 2.0, 64), "c": ("legacy", None, 1.0, 16)}


def one_word_items(count: int, seed: int) -> list[dict]:
    words = sorted(set(TEXT.split()))
    rng = random.Random(seed)
    return [
        {
            "id": f"w{i}",
            "query": " ".join(rng.choices(words, k=rng.randint(3, 10))),
            "choices": [" " + word for word in rng.sample(words, 4)],
            "gold": i % 4,
        }
        for i in range(count)
    ]


def stderr(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def paired(reference: np.ndarray, soup: np.ndarray) -> dict:
    return {
        "base": reference.mean(),
        "base_stderr": stderr(reference),
        "candidate": soup.mean(),
        "candidate_stderr": stderr(soup),
        "delta": (soup - reference).mean(),
        "delta_stderr": stderr(soup - reference),
    }


def ratio(nll: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """Token-weighted loss and its ratio-estimator standard error (documents are the units)."""
    value = nll.sum() / tokens.sum()
    residuals = nll - value * tokens
    return value, np.sqrt((residuals**2).sum() / (len(nll) * (len(nll) - 1))) / tokens.mean()


def paired_loss(reference: np.ndarray, soup: np.ndarray, tokens: np.ndarray) -> dict:
    (b, b_se), (c, c_se), (d, d_se) = (ratio(x, tokens) for x in (reference, soup, soup - reference))
    return {"base": b, "base_stderr": b_se, "candidate": c, "candidate_stderr": c_se, "delta": d, "delta_stderr": d_se}


@pytest.fixture(scope="module")
def souped(tmp_path_factory, tiny_model_dir) -> dict:
    """A tiny two-phase run (20 steps, the anneal from step 10) with 3 ingredients, uniform soup,
    4 held-out documents per source (3 scored), trained, evaluated, audited and published."""
    folder = tmp_path_factory.mktemp("soup")
    gates = {**LENIENT, "max_benchmark_drop": 1.0}  # a 20-step tiny run: a few items may flip either way
    path, workdir = prepare(
        folder,
        tiny_model_dir,
        max_lr=1e-2,  # ingredients far enough apart to score differently
        gates=gates,
        run_data_stages=False,
        held_out_docs=4,
        validation_tokens=8 * 32,
    )
    spec = yaml.safe_load(path.read_text())
    spec["soup"] = {"ingredients": 3}
    spec["evaluate"] |= {"benchmarks": [], "batch_size": 64, "validation_docs": 3}  # fewer, fuller batches
    items = {}
    for seed, (name, (domain, metric, weight, count)) in enumerate(BENCHMARKS.items(), 1):
        items[name] = (one_word_items if name == "a" else make_items)(count, seed)
        write_jsonl(folder / f"{name}.jsonl", items[name])
        spec["evaluate"]["benchmarks"].append(
            {"name": name, "path": f"{name}.jsonl", "domain": domain, "metric": metric, "weight": weight}
        )
    path.write_text(yaml.safe_dump(spec))
    recipe = load_recipe(path)
    reports = {}
    for stage in (run_curate, run_tokenize, run_mix, run_train, run_evaluate, run_audit, run_publish):
        reports[stage.__name__.removeprefix("run_")] = stage(recipe, workdir)
    return {"recipe": recipe, "workdir": workdir, "items": items, **reports}


def per_item(recipe, workdir: Path, items: dict) -> tuple[dict, dict]:
    """Scored here, model by model: per benchmark, each model's per-item correctness; per
    source, each model's per-document NLL and tokens."""
    models = {"soup": final_model(workdir), **{i: p for i, p in enumerate(ingredient_models(workdir))}}
    tokenizer = recipe.tokenizer or recipe.base_model.path
    correct, losses = {name: {} for name in items}, {}
    texts = {s.name: validation_texts(workdir, s.name, recipe.evaluate.validation_docs) for s in recipe.sources}
    for model, folder in models.items():
        scorer = Scorer(folder, tokenizer, recipe.evaluate.batch_size)
        for name, bench in items.items():
            correct[name][model] = choice_metrics(bench, scorer.choice_loglikelihoods(bench))
        for source, docs in texts.items():
            nll, tokens, _ = scorer.document_losses(docs, recipe.tokenize.seq_len)
            losses.setdefault(source, {})[model] = nll
            losses[source]["tokens"] = tokens
        scorer.release()
    return correct, losses


@on_the_souped_run
def test_evaluate_scores_each_ingredient_beside_the_soup_paired(souped):
    recipe, workdir, report = souped["recipe"], souped["workdir"], souped["evaluate"]
    soup = report["soup"]
    assert [i["index"] for i in soup["ingredients"]] == [0, 1, 2] and len(ingredient_models(workdir)) == 3
    assert (soup["method"], soup["kept"], soup["branch_step"]) == ("uniform", [0, 1, 2], 10)
    assert "safety" in soup["safety"] and "only" in soup["safety"]
    # each ingredient scored on the benchmarks and validation sets, not on the safety probes
    scored = report["scoring"]["models"]
    tasks = len(BENCHMARKS) + len(report["validation"])
    assert [scored[f"ingredient-{i}"]["tasks_scored"] for i in range(3)] == [tasks] * 3
    assert scored["candidate"]["tasks_scored"] > tasks  # the candidate (the soup) also ran the probes
    assert report["candidate_model"] == str(final_model(workdir))

    correct, losses = per_item(recipe, workdir, souped["items"])
    changed = False
    for name in BENCHMARKS:
        for metric in METRICS:
            figures, each = soup["benchmarks"][name][metric], [correct[name][i][metric] for i in range(3)]
            mine = correct[name]["soup"][metric]
            assert report["benchmarks"][name][metric]["candidate"] == pytest.approx(mine.mean())  # the soup is gated
            for i in range(3):
                assert figures["vs_ingredients"][i] == pytest.approx(paired(each[i], mine)), (name, metric, i)
                changed |= bool((each[i] != mine).any())
            assert figures["vs_mean"] == pytest.approx(paired(np.mean(each, axis=0), mine)), (name, metric)
    assert changed  # some item tells the soup from an ingredient: the paired figures are not all zero
    assert set(soup["validation"]) == {"old", "new"}
    for source, nll in losses.items():
        each, tokens = [nll[i] for i in range(3)], nll["tokens"]
        figures = soup["validation"][source]
        for i in range(3):
            assert figures["vs_ingredients"][i] == pytest.approx(paired_loss(each[i], nll["soup"], tokens))
        assert figures["vs_mean"] == pytest.approx(paired_loss(np.mean(each, axis=0), nll["soup"], tokens))
        assert report["validation"][source]["candidate_loss_per_token"] == pytest.approx(
            figures["vs_mean"]["candidate"]
        )

    # the best ingredient: the highest counted average under the gain gate's weights (the audit's)
    counted, shares = (
        judged_soup(recipe, report),
        {n: b["share"] for n, b in judged_scores(recipe, report)["benchmarks"].items()},
    )
    metric = {"a": "acc", "c": "acc_norm"}
    averages = [sum(shares[n] * correct[n][i][metric[n]].mean() for n in BENCHMARKS) for i in range(3)]
    mean_loss = [np.mean([nll[i].sum() / nll["tokens"].sum() for nll in losses.values()]) for i in range(3)]
    best = min(range(3), key=lambda i: (-round(averages[i], 12), mean_loss[i], i))
    assert counted["best"] == best and [i["average"] for i in counted["ingredients"]] == pytest.approx(averages)
    soup_average = sum(shares[n] * correct[n]["soup"][metric[n]].mean() for n in BENCHMARKS)
    assert counted["average"]["vs_best"]["delta"] == pytest.approx(soup_average - averages[best])
    assert counted["average"]["vs_mean"]["delta"] == pytest.approx(soup_average - np.mean(averages))
    for n in BENCHMARKS:
        assert counted["benchmarks"][n]["metric"] == metric[n]
        assert counted["benchmarks"][n]["vs_best"] == soup["benchmarks"][n][metric[n]]["vs_ingredients"][best]
    assert counted["validation"]["old"]["role"] == "legacy"


@on_the_souped_run
def test_the_audit_gates_the_soup_and_lists_every_ingredient_and_the_cost_of_each_anneal(souped):
    workdir, audit, trained = souped["workdir"], souped["audit"], souped["train"]
    assert audit["passed"] and audit["candidate"] == str(final_model(workdir))
    assert audit["soup"] == judged_soup(souped["recipe"], souped["evaluate"])

    lineage = audit["lineage"]["soup"]
    assert (lineage["method"], lineage["kept"], lineage["branch_step"]) == ("uniform", [0, 1, 2], 10)
    assert "uniform average" in lineage["rule"]
    for index, (entry, model) in enumerate(zip(lineage["ingredients"], ingredient_models(workdir))):
        assert entry["index"] == index and entry["model"] == str(model.relative_to(workdir))
        assert entry["weights_sha256"] == {"model.safetensors": file_sha256(model / "model.safetensors")}
        assert entry["val_loss"] == trained["ingredients"][index]["val_loss"] is not None
    assert next(g for g in audit["gates"] if g["name"] == "lineage")["passed"]
    health = next(g for g in audit["gates"] if g["name"] == "training_health")  # each ingredient's log, prefix included
    assert health["passed"] and health["reason"].startswith("20 + 20 + 20 steps, all finite")

    cost, shared = audit["cost"], trained["soup"]["shared_tokens"]
    anneals = [i["anneal_tokens"] for i in trained["ingredients"]]
    assert shared == 10 * 4 * 32 and anneals == [10 * 4 * 32] * 3  # 10 steps of 4 sequences of 32 tokens each
    assert cost["tokens"] == shared + sum(anneals) + cost["optimizer_warmup_tokens"]
    assert cost["soup"] == {"ingredients": 3, "shared_tokens": shared, "anneal_tokens": anneals}

    markdown = (workdir / "audit" / "report.md").read_text()
    soup_part = markdown[markdown.index("## Soup") :]
    assert all(f"| ingredient {i}" in soup_part for i in range(3)) and "| **soup** |" in soup_part
    assert "| the best ingredient (" in soup_part and "| the mean of the ingredients |" in soup_part
    assert f"| of which the shared prefix, trained once | {shared:,} |" in markdown
    assert " + ".join(f"{t:,}" for t in anneals) in markdown
    lineage_part = markdown[markdown.index("## Lineage") :]
    for entry in lineage["ingredients"]:
        assert f"ingredient {entry['index']}: `{entry['model']}`" in lineage_part
        assert entry["weights_sha256"]["model.safetensors"] in lineage_part


@on_the_souped_run
def test_the_model_card_lists_the_ingredients_and_the_averaging_rule(souped):
    recipe, published, lineage = souped["recipe"], souped["publish"], souped["audit"]["lineage"]["soup"]
    card = Registry(recipe).read(f"{published['version']}/README.md").decode()
    section = card[card.index("## Soup") :]
    assert "uniform average of the weights of ingredients 0, 1, 2" in section and "step 10" in section
    for entry in lineage["ingredients"]:
        assert entry["weights_sha256"]["model.safetensors"] in section
    assert "against the best ingredient (" in section and "against their mean" in section
    record = json.loads(Registry(recipe).read(f"{published['version']}/eval_report.json"))
    assert record["soup"] == souped["evaluate"]["soup"]


def test_a_greedy_soup_lineage_names_the_order_tried_and_a_missing_ingredient_hash_fails_the_gate(tmp_path):
    """Without running anything: the lineage of a greedy soup from its soup.json, each ingredient's
    weights hashed from its folder when the train marker has none; the lineage gate names an
    ingredient without weights."""
    from refit.stages.audit.gates import lineage_gate
    from refit.stages.audit.stage import soup_lineage

    train = tmp_path / "train"
    for i in range(3):
        (train / "ingredients" / str(i) / "final").mkdir(parents=True)
        (train / "ingredients" / str(i) / "final" / "model.safetensors").write_bytes(bytes([i]) * 10)
    (train / "final").mkdir()
    rule = {
        "method": "greedy",
        "branch_step": 7,
        "ingredients": [{"index": i, "model": f"ingredients/{i}/final", "val_loss": 3.0 + i} for i in range(3)],
        "order": [2, 0, 1],
        "kept": [0, 2],
    }
    (train / "final" / "soup.json").write_text(json.dumps(rule))
    record = soup_lineage(tmp_path)
    assert record["kept"] == [0, 2] and record["branch_step"] == 7
    assert "ingredients 0, 2" in record["rule"] and "order 2, 0, 1" in record["rule"]
    model = train / "ingredients" / "1" / "final" / "model.safetensors"
    assert record["ingredients"][1] == {
        "index": 1,
        "model": "train/ingredients/1/final",
        "weights_sha256": {"model.safetensors": file_sha256(model)},
        "val_loss": 4.0,
    }
    hashes = {"base_weights_sha256": {"model.safetensors": "x"}, "shards_verified": True}
    assert lineage_gate({**hashes, "soup": record})["passed"]
    model.unlink()
    failed = lineage_gate({**hashes, "soup": soup_lineage(tmp_path)})
    assert not failed["passed"] and "soup.ingredients[1].weights_sha256" in failed["reason"]
    assert soup_lineage(tmp_path / "elsewhere") is None  # no soup: no lineage entry


def test_without_counted_benchmarks_the_best_ingredient_has_the_lowest_validation_loss(tmp_path):

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    for name in ("old", "new", "qa"):
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", [{}])
    recipe = load_recipe(write_recipe(tmp_path, BASE_RECIPE))
    assert recipe.evaluate.benchmarks == []

    def loss(reference: float) -> dict:
        return {"base": reference, "candidate": 2.0, "delta": 2.0 - reference, "base_stderr": 0.1}

    soup = {
        "method": "uniform",
        "branch_step": 5,
        "kept": [0, 1],
        "ingredients": [{"index": 0}, {"index": 1}],
        "benchmarks": {},
        "validation": {
            "old": {"vs_ingredients": [loss(2.5), loss(2.1)], "vs_mean": loss(2.3)},
            "new": {"vs_ingredients": [loss(2.2), loss(2.4)], "vs_mean": loss(2.3)},
        },
    }
    validation = {"old": {"role": "legacy"}, "new": {"role": "new"}}
    judged = judged_soup(recipe, {"benchmarks": {}, "validation": validation, "soup": soup})
    assert judged["best"] == 1 and "validation loss" in judged["best_by"]  # 2.25 against 2.35 on average
    assert judged["average"] == {"vs_best": None, "vs_mean": None}
    assert judged["validation"]["old"]["vs_best"] == loss(2.1) and judged["validation"]["new"]["role"] == "new"
    assert judged_soup(recipe, {"benchmarks": {}, "validation": validation}) is None  # no soup
