"""The vectorised MinHash signature step: datatrove's normalisation, files datatrove's bucket
step reads, planted near-duplicates found through curate's near-dedupe and unrelated
documents left alone, whatever the number of workers."""

from __future__ import annotations

import pytest
from conftest import LEGACY, NEW, edited, jaccard
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.dedup.minhash import MinhashConfig, read_sigs

from refit.stages.core.config import CurateSpec
from refit.stages.curate.minhash import FastMinhashSignature, unicode_words, words
from refit.stages.curate.near_dedup import near_dedup


def test_words_follow_datatrove_normalisation():
    text = "Hello, World! Pi is 3.14 (or 3,14); the café_au-lait ─┼─ naïve\tDON'T"
    expected = ["hello", "world", "pi", "is", "0", "or", "0", "the", "cafe", "au", "lait", "─", "┼", "─", "naive"]
    assert words(text) == [*expected, "don", "t"]
    ascii_text = "x86_64 builds: 10,000 files in /usr/lib64 -- see README.md\x00"
    expected = ["x0", "0", "builds", "0", "files", "in", "usr", "lib0", "see", "readme", "md"]
    assert words(ascii_text) == unicode_words(ascii_text) == expected


def test_signature_files_are_read_by_datatrove(tmp_path):
    config = MinhashConfig()
    texts = [doc["text"] for doc in LEGACY[:6]]
    texts.insert(2, "too short to shingle")  # fewer words than n_grams: no signature, as in datatrove
    FastMinhashSignature(str(tmp_path), config=config, batch_words=300).run(  # several batches
        Document(text=t, id=str(i)) for i, t in enumerate(texts)
    )
    folder = get_datafolder(str(tmp_path))
    for bucket in range(config.num_buckets):
        path = f"bucket_{bucket:03d}/00000.minhash.sig"
        # datatrove's reader asserts the records are sorted and reads up to its maximum hash
        signatures = list(read_sigs(folder.open(path, "rb"), 0, config))
        assert sorted(s.doc_id for s in signatures) == [0, 1, 3, 4, 5, 6]
        assert all(len(s.sig) == config.hashes_per_bucket for s in signatures)
        assert len({s.sig for s in signatures}) == 6


@pytest.mark.parametrize("workers", [1, 2])
def test_planted_near_duplicates_are_found_and_unrelated_documents_kept(tmp_path, workers):
    originals = [doc["text"] for doc in LEGACY[:10] + NEW[:10]]
    copies = [edited(text, seed) for seed, text in enumerate(originals)]  # word 5-gram Jaccard 0.85-0.9
    assert all(jaccard(a, b) > 0.85 for a, b in zip(originals, copies))
    unrelated = [doc["text"] for doc in LEGACY[10:30] + NEW[10:30]]
    docs = originals + unrelated + copies
    removed = near_dedup(docs, tmp_path / "work", tmp_path / "index", "batch-0001", CurateSpec(workers=workers))
    first_copy = len(originals) + len(unrelated)
    assert removed == {first_copy + i: i for i in range(len(originals))}
