"""The bundled demo data: small, well-formed, deterministic, and benchmarks not in the corpora."""

import pytest
from conftest import DATASETS, rows

from refit.stages.core.text import word_ngrams

CORPORA = ["legacy_python_docs.jsonl.gz", "new_postgres_docs.jsonl.gz", "qa_docs.jsonl.gz"]
BENCHMARKS = sorted((DATASETS / "benchmarks").glob("*.jsonl"))


def test_datasets_folder_is_data_only_and_small():
    assert not (DATASETS / "__init__.py").exists()  # would shadow the HF `datasets` package
    total = sum(p.stat().st_size for p in DATASETS.rglob("*") if p.is_file())
    assert total <= 10 * 2**20
    assert (DATASETS / "README.md").is_file()


@pytest.mark.parametrize("name", CORPORA)
def test_corpora_have_unique_ids_and_text(name):
    docs = rows(DATASETS / name)
    assert len(docs) > 500
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(isinstance(d["text"], str) and d["text"].strip() for d in docs)


def test_at_least_three_benchmarks_covering_both_domains():
    assert len(BENCHMARKS) >= 3
    names = {p.stem for p in BENCHMARKS}
    assert {"sql_commands", "sql_cloze", "python_cloze"} <= names


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_format(path):
    items = rows(path)
    assert len(items) >= 200
    assert len({i["id"] for i in items}) == len(items)
    for item in items:
        assert set(item) == {"id", "query", "choices", "gold"}
        assert len(item["choices"]) >= 2 and all(c.startswith(" ") for c in item["choices"])
        assert 0 <= item["gold"] < len(item["choices"])
        assert len(set(item["choices"])) == len(item["choices"])


def test_benchmarks_share_no_13_gram_with_the_corpora():
    seen = set()
    for name in CORPORA:
        for doc in rows(DATASETS / name):
            seen |= word_ngrams(doc["text"], 13)
    for path in BENCHMARKS:
        for item in rows(path):
            assert not word_ngrams(item["query"] + item["choices"][item["gold"]], 13) & seen, item["id"]
