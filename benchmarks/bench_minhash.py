"""MinHash signatures: Refit's vectorised step against datatrove's, quality and throughput.

    python benchmarks/bench_minhash.py [--rounds 3] [--per-level 40] [--repeat 1]

Input: documents of the demo corpora (datasets/*.jsonl.gz) with at least 80 words that share
few word 5-grams with each other. Each round plants, for --per-level originals at each
target similarity 0.50, 0.55, ..., 0.95, a copy edited by seeded word replacements, deletions
and insertions until the word 5-gram Jaccard of copy and original (refit.stages.core.text's
words) is as close to the target as it gets; the documents left over are unrelated ones.

Quality: curate's near-dedupe (refit.stages.curate.near_dedup: the signature step, then
datatrove's buckets and clusters) with the recipe's MinHash settings (curate.minhash
defaults), once with each signature step, over the same documents. Predicted pairs: two
documents in one cluster. True pairs: planted pairs whose Jaccard is at least the LSH
threshold of the settings, (1/buckets)^(1/hashes_per_bucket). Every other pair is not a
duplicate. Prints precision and recall pooled over the rounds (each round plants new
copies) with their binomial standard errors, and recall per similarity level.
Requirement: recall at least 0.98x datatrove's at no lower precision.

Throughput: each signature step alone, in this process (one core), over the first round's
documents, best of --repeat; MB/s of UTF-8 text. Target: at least 10x datatrove's. The
signatures it wrote then estimate each planted pair's Jaccard (share of equal hashes):
bias and RMSE against the measured Jaccard, next to those of an ideal MinHash.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LOGURU_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature  # noqa: E402

from refit.stages.core.config import CurateSpec, MinHashSpec  # noqa: E402
from refit.stages.core.text import word_ngrams  # noqa: E402
from refit.stages.curate.minhash import FastMinhashSignature  # noqa: E402
from refit.stages.curate.near_dedup import near_dedup  # noqa: E402

DATASETS = Path(__file__).resolve().parent.parent / "datasets"
LEVELS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
STEPS = {"datatrove": MinhashDedupSignature, "vectorised": FastMinhashSignature}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def corpus() -> list[str]:
    """Demo documents of at least 80 words, each sharing under 5% of its word 5-grams with
    the documents chosen before it (the corpora hold some near-duplicates of their own)."""
    chosen, seen = [], set()
    for path in sorted(DATASETS.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                text = json.loads(line)["text"]
                grams = word_ngrams(text, 5)
                if len(text.split()) >= 80 and len(grams & seen) < 0.05 * len(grams):
                    chosen.append(text)
                    seen |= grams
    return chosen


def edit_to(text: str, target: float, n: int, vocabulary: list[str], rng: random.Random) -> tuple[str, float]:
    """A copy of text whose word n-gram Jaccard with it is as close to target as the first k
    (at least one) of a seeded sequence of word edits (replace, delete, insert) allows;
    (copy, Jaccard)."""
    original = text.split()
    edits = [(rng.choice("rdi"), rng.random(), rng.choice(vocabulary)) for _ in original]

    def apply(k: int) -> str:
        copy = list(original)
        for kind, where, word in edits[:k]:
            i = int(where * len(copy))
            if kind == "r":
                copy[i] = word
            elif kind == "d" and len(copy) > n:
                del copy[i]
            else:
                copy.insert(i, word)
        return " ".join(copy)

    grams = word_ngrams(text, n)
    similarity = {}

    def at(k: int) -> float:
        if k not in similarity:
            similarity[k] = jaccard(grams, word_ngrams(apply(k), n))
        return similarity[k]

    low, high = 1, len(edits)  # similarity falls with k: the last k >= 1 still at or above target
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if at(middle) >= target else (low, middle - 1)
    best = min((low, min(low + 1, len(edits))), key=lambda k: abs(at(k) - target))
    return apply(best), at(best)


def plant(texts: list[str], per_level: int, n: int, seed: int) -> tuple[list[str], list[tuple[int, int, float, float]]]:
    """Documents (originals, unrelated ones, then copies, shuffled) and the planted pairs as
    (original position, copy position, target level, measured Jaccard)."""
    rng = random.Random(seed)
    order = rng.sample(range(len(texts)), len(texts))
    originals = order[: per_level * len(LEVELS)]
    vocabulary = sorted({w for i in order[len(originals) :] for w in texts[i].split()})
    docs = [texts[i] for i in order]
    pairs = []
    for slot, source in enumerate(originals):
        level = LEVELS[slot % len(LEVELS)]
        copy, similarity = edit_to(texts[source], level, n, vocabulary, rng)
        pairs.append((slot, len(docs), level, similarity))
        docs.append(copy)
    return docs, pairs


def predicted_pairs(docs: list[str], signatures: str, spec: MinHashSpec) -> set[tuple[int, int]]:
    """Pairs of documents put in one cluster by curate's near-dedupe with that signature step."""
    spec = spec.model_copy(update={"signatures": signatures})
    with tempfile.TemporaryDirectory() as tmp:
        removed = near_dedup(
            docs, Path(tmp) / "work", Path(tmp) / "index", "batch", CurateSpec(minhash=spec, workers=1)
        )
    clusters: dict[int, list[int]] = {}
    for duplicate, kept in removed.items():
        clusters.setdefault(kept, [kept]).append(duplicate)
    return {(a, b) for members in clusters.values() for a in members for b in members if a < b}


def read_signatures(folder: Path, config: MinhashConfig) -> dict[int, np.ndarray]:
    """Each document's full signature (every bucket's hashes, in order) from the signature files."""
    record = np.dtype([("hashes", "<u8", (config.hashes_per_bucket,)), ("document", "<u4")])
    bands: dict[int, list[np.ndarray]] = {}
    for bucket in range(config.num_buckets):
        for row in np.fromfile(folder / f"bucket_{bucket:03d}" / "00000.minhash.sig", dtype=record):
            bands.setdefault(int(row["document"]), []).append(row["hashes"])
    return {document: np.concatenate(parts) for document, parts in bands.items()}


def signature_run(step: str, docs: list[str], config: MinhashConfig, repeat: int) -> tuple[float, dict]:
    """Seconds of the signature step alone over docs (best of repeat) and the signatures it wrote."""
    best = math.inf
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            signature_step = STEPS[step](output_folder=tmp, config=config)  # spaCy loads here, untimed
            documents = [Document(text=text, id=str(i)) for i, text in enumerate(docs)]
            started = time.perf_counter()
            signature_step.run(iter(documents))
            best = min(best, time.perf_counter() - started)
            signatures = read_signatures(Path(tmp), config)
    return best, signatures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="independent planted sets (new copies each)")
    parser.add_argument("--per-level", type=int, default=40, help="planted pairs per similarity level and round")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each signature step (best kept)")
    args = parser.parse_args()
    spec = MinHashSpec()
    threshold = (1 / spec.buckets) ** (1 / spec.hashes_per_bucket)
    texts = corpus()
    print(
        f"{len(texts)} distinct demo documents of >= 80 words; MinHash {spec.ngram}-grams, {spec.buckets} buckets x "
        f"{spec.hashes_per_bucket} hashes (LSH threshold {threshold:.3f}); {args.rounds} rounds x "
        f"{args.per_level * len(LEVELS)} planted pairs"
    )
    counts = {step: {"true_positive": 0, "predicted": 0, "true": 0} for step in STEPS}
    found = {step: {level: 0 for level in LEVELS} for step in STEPS}
    planted_per_level = {level: 0 for level in LEVELS}
    first_round: list[str] = []
    first_pairs: list[tuple[int, int, float, float]] = []
    for round_ in range(args.rounds):
        docs, pairs = plant(texts, args.per_level, spec.ngram, seed=round_)
        first_round, first_pairs = (first_round, first_pairs) if first_round else (docs, pairs)
        true = {(a, b) for a, b, _, similarity in pairs if similarity >= threshold}
        for level in LEVELS:
            planted_per_level[level] += sum(p[2] == level for p in pairs)
        for step in STEPS:
            started = time.perf_counter()
            predicted = predicted_pairs(docs, step, spec)
            counts[step]["true_positive"] += len(predicted & true)
            counts[step]["predicted"] += len(predicted)
            counts[step]["true"] += len(true)
            for a, b, level, _ in pairs:
                found[step][level] += (a, b) in predicted
            print(
                f"round {round_}: {len(docs)} documents, {len(true)} true pairs; {step}: {len(predicted)} predicted, "
                f"{len(predicted & true)} true ({time.perf_counter() - started:.1f} s near-dedupe)",
                flush=True,
            )
    print("\n| signatures | predicted pairs | true pairs found | precision | recall |")
    print("|---|---|---|---|---|")
    quality = {}
    for step, c in counts.items():
        precision = c["true_positive"] / c["predicted"] if c["predicted"] else 1.0
        recall = c["true_positive"] / c["true"]
        quality[step] = precision, recall
        print(
            f"| {step} | {c['predicted']} | {c['true_positive']} of {c['true']} | {precision:.4f} "
            f"+- {math.sqrt(precision * (1 - precision) / max(c['predicted'], 1)):.4f} | {recall:.4f} "
            f"+- {math.sqrt(recall * (1 - recall) / c['true']):.4f} |"
        )
    print("\nshare of planted pairs found, by target similarity:")
    print("| level | " + " | ".join(STEPS) + " |\n|---|" + "---|" * len(STEPS))
    for level in LEVELS:
        shares = [f"{found[step][level] / planted_per_level[level]:.3f}" for step in STEPS]
        print(f"| {level:.2f} | " + " | ".join(shares) + " |")
    (stock_precision, stock_recall), (fast_precision, fast_recall) = quality["datatrove"], quality["vectorised"]
    print(
        f"\nrecall ratio vectorised/datatrove {fast_recall / stock_recall:.4f} (requirement >= 0.98), "
        f"precision {fast_precision:.4f} vs {stock_precision:.4f} (requirement: no lower)"
    )

    config = MinhashConfig(n_grams=spec.ngram, num_buckets=spec.buckets, hashes_per_bucket=spec.hashes_per_bucket)
    megabytes = sum(len(t.encode()) for t in first_round) / 1e6
    print(f"\nsignature step alone, one process, {len(first_round)} docs ({megabytes:.2f} MB), best of {args.repeat}:")
    print("| signatures | seconds | MB/s per core |\n|---|---|---|")
    seconds, estimates = {}, {}
    for step in STEPS:
        seconds[step], signatures = signature_run(step, first_round, config, args.repeat)
        print(f"| {step} | {seconds[step]:.2f} | {megabytes / seconds[step]:.3f} |", flush=True)
        estimates[step] = np.array([np.mean(signatures[a] == signatures[b]) for a, b, _, _ in first_pairs])
    print(f"\nspeed-up vectorised/datatrove: {seconds['datatrove'] / seconds['vectorised']:.1f}x (target >= 10x)")

    similarity = np.array([pair[3] for pair in first_pairs])
    ideal = math.sqrt(np.mean(similarity * (1 - similarity) / config.num_buckets / config.hashes_per_bucket))
    print(
        f"\nJaccard of round 0's {len(first_pairs)} planted pairs estimated from the signatures (share of equal "
        f"hashes), error against the measured Jaccard (ideal MinHash: bias 0, RMSE {ideal:.4f}):"
    )
    print("| signatures | bias | RMSE |\n|---|---|---|")
    for step, estimate in estimates.items():
        error = estimate - similarity
        print(f"| {step} | {error.mean():+.4f} | {math.sqrt(np.mean(error**2)):.4f} |")


if __name__ == "__main__":
    main()
