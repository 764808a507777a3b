"""curate and tokenize at growing input: peak memory, incremental cost, throughput against
stock datatrove, and the Ray executor's overhead.

    python benchmarks/bench_curate_scale.py [--mb 64] [--stock-mb 4] [--workers 2] [--ray] [--skip-tokenize]

Input: the legacy and new demo corpora (deployments/demo.yaml's first two sources) grown to
--mb MB of JSONL by seeded perturbed copies (10-40% of the words of a random demo document
replaced by other words of the corpus, so near- and non-duplicates both occur, with some
exact copies), in files of FILE_MB; decontamination against the demo's three benchmarks.
Each measurement runs in a fresh Python process, which prints its own peak RSS and the
largest of its forked workers'.
- memory: curate, then tokenize (a 4096-token BPE trained on the demo corpora), on the
  first quarter of the files and on all of them; growth ratio (target <= 1.2x, peak < 2 GB);
- incremental: 1% more new files added to the whole input, curated as the next batch,
  against the full run's time (target <= 5%);
- throughput, last: the first --stock-mb MB through the bare stock datatrove MinHash pipeline
  (bench_curate.py's: reader, spaCy signatures, buckets, clusters, filter, writer) and
  through Refit's curate (with --stock-mb at least --mb, the whole input's curate above),
  MB/s per core each and the ratio;
- --ray: the same slice curated on a private local Ray cluster against the local executor.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "deployments" / "demo.yaml"
FILE_MB = 1.0
MEASURE = """
import json, resource, sys, time
from pathlib import Path
from refit.stages.core.config import load_recipe
stage, recipe, workdir = sys.argv[1], load_recipe(Path(sys.argv[2])), Path(sys.argv[3])
started = time.time()
if stage == "curate":
    from refit.stages.curate.stage import run_curate
    report = run_curate(recipe, workdir)
    result = {"kept": sum(s["train_docs"] + s["validation_docs"] for s in report["sources"].values()),
              "removed": sum(sum(s["removed"].values()) for s in report["sources"].values())}
elif stage == "stock":
    sys.path.insert(0, sys.argv[4])
    from bench_curate import bare_datatrove
    files = [Path(p) for s in recipe.sources for p in s.paths]
    bare_datatrove(files, workdir, recipe.curate.workers, recipe.curate.minhash)
    result = {}
else:
    from refit.stages.tokenize.stage import run_tokenize
    report = run_tokenize(recipe, workdir)
    result = {"tokens": sum(s["tokens"] for s in report["sources"].values())}
print(json.dumps(result | {
    "seconds": time.time() - started,
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def demo_docs(name: str) -> list[str]:
    with gzip.open(ROOT / "datasets" / name, "rt", encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def grow(docs: list[str], folder: Path, megabytes: float, seed: int, file_mb: float = FILE_MB) -> list[Path]:
    """JSONL files of file_mb each holding seeded perturbed copies of docs, megabytes in all."""
    rng = random.Random(seed)
    vocabulary = sorted({w for d in docs[:200] for w in d.split()})
    folder.mkdir(parents=True, exist_ok=True)
    files, written, number = [], 0, 0
    while written < megabytes * 1e6:
        path = folder / f"part-{seed}-{len(files):04d}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            size = 0
            while size < file_mb * 1e6:
                words = rng.choice(docs).split(" ")
                if rng.random() > 0.02:  # 2%: an exact copy
                    for i in rng.sample(range(len(words)), int(len(words) * rng.uniform(0.1, 0.4))):
                        words[i] = rng.choice(vocabulary)
                line = json.dumps({"id": f"{seed}-{number}", "text": " ".join(words)}) + "\n"
                out.write(line)
                size += len(line.encode())
                number += 1
        files.append(path)
        written += size
    return files


def recipe_for(tmp: Path, name: str, sources: dict[str, list[Path]], workers: int, tokenizer: Path, **curate) -> Path:
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["workdir"] = str(tmp / name / "wd")
    base = tmp / "base"  # curate does not read the model; the recipe needs one
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    recipe["base_model"] = {"path": str(base), "pretraining_min_lr": 3e-4}
    recipe["tokenizer"] = str(tokenizer)
    recipe["sources"] = [
        {"name": source, "paths": [str(p) for p in paths], "role": role}
        for (source, paths), role in zip(sources.items(), ("legacy", "new"))
    ]
    recipe["curate"] = {"workers": workers, **curate}
    recipe["tokenize"] = {"seq_len": 256, "workers": workers}
    for bench in recipe["evaluate"]["benchmarks"]:
        bench["path"] = str((RECIPE.parent / bench["path"]).resolve())
    recipe.pop("mixture", None)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def measure(stage: str, recipe: Path, workdir: Path) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, stage, str(recipe), str(workdir), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "LOGURU_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def megabytes(sources: dict[str, list[Path]]) -> float:
    return sum(p.stat().st_size for files in sources.values() for p in files) / 1e6


def show(name: str, result: dict) -> None:
    print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="size of the whole input (MB of JSONL)")
    parser.add_argument("--stock-mb", type=float, default=4, help="slice run through stock datatrove (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also curate the slice on a private local Ray cluster")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-tokenize", action="store_true", help="measure curate's memory only")
    args = parser.parse_args()
    from refit.flows.demo_base import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        legacy, new = demo_docs("legacy_python_docs.jsonl.gz"), demo_docs("new_postgres_docs.jsonl.gz")
        tokenizer = tmp / "tokenizer"
        train_tokenizer(legacy + new, vocab_size=4096, out_dir=tokenizer)
        corpora = {
            "python": grow(legacy, tmp / "data" / "python", args.mb / 2, 1),
            "postgres": grow(new, tmp / "data" / "postgres", args.mb / 2, 2),
        }
        whole = None if args.skip_memory else memory_and_incremental(args, tmp, corpora, tokenizer, legacy, new)
        if args.stock_mb:
            # the whole input's curate, measured above, is not run again for the comparison
            throughput(args, tmp, corpora, tokenizer, whole if args.stock_mb >= args.mb else None)


def memory_and_incremental(args, tmp: Path, corpora: dict, tokenizer: Path, legacy: list, new: list) -> dict:
    """Curate (and tokenize) on the first quarter of the files and on all of them, then 1%
    more files as the next batch; the whole input's curate result."""
    results = {}
    for name, share in (("quarter", 0.25), ("whole", 1.0)):
        sources = {s: files[: max(1, round(len(files) * share))] for s, files in corpora.items()}
        recipe = recipe_for(tmp, name, sources, args.workers, tokenizer)
        size = megabytes(sources)
        results[name, "curate"] = measure("curate", recipe, tmp / name / "wd")
        show(f"curate {name} ({size:.1f} MB)", results[name, "curate"])
        if not args.skip_tokenize:
            results[name, "tokenize"] = measure("tokenize", recipe, tmp / name / "wd")
            show(f"tokenize {name} ({size:.1f} MB)", results[name, "tokenize"])
        results[name, "input"] = size
    print(f"input {results['whole', 'input'] / results['quarter', 'input']:.2f}x")
    for stage in ("curate",) if args.skip_tokenize else ("curate", "tokenize"):
        quarter, whole = results["quarter", stage], results["whole", stage]
        print(
            f"{stage}: peak RSS {whole['peak_mb'] / quarter['peak_mb']:.2f}x "
            f"({quarter['peak_mb']:.0f} -> {whole['peak_mb']:.0f} MB), largest worker "
            f"{whole['worker_peak_mb'] / quarter['worker_peak_mb']:.2f}x "
            f"({quarter['worker_peak_mb']:.0f} -> {whole['worker_peak_mb']:.0f} MB) (target <= 1.2x, < 2 GB)",
            flush=True,
        )
    full = results["whole", "curate"]["seconds"]
    added = {
        "python": grow(legacy, tmp / "data" / "python", args.mb / 200, 3, args.mb / 200),
        "postgres": grow(new, tmp / "data" / "postgres", args.mb / 200, 4, args.mb / 200),
    }
    sources = {s: corpora[s] + added[s] for s in corpora}
    recipe = recipe_for(tmp, "whole", sources, args.workers, tokenizer)
    result = measure("curate", recipe, tmp / "whole" / "wd")
    show(f"curate +{megabytes(added):.2f} MB new files ({megabytes(added) / megabytes(corpora):.1%})", result)
    print(f"incremental: {result['seconds'] / full:.1%} of the full run's {full:.1f} s (target <= 5%)", flush=True)
    for name in ("quarter", "whole"):
        shutil.rmtree(tmp / name, ignore_errors=True)
    for files in added.values():  # the throughput runs read the first input only
        for path in files:
            path.unlink()
    return results["whole", "curate"]


def throughput(args, tmp: Path, corpora: dict, tokenizer: Path, whole_curate: dict | None) -> None:
    """Stock datatrove's MinHash pipeline against Refit's curate on the first --stock-mb MB
    (and on Ray with --ray): MB/s per core each, and the ratios."""
    share = args.stock_mb / args.mb
    sliced = {s: files[: max(1, round(len(files) * share))] for s, files in corpora.items()}
    size = megabytes(sliced)
    runs = {"stock datatrove MinHash": "stock", "refit curate": "curate"}
    if args.ray:
        runs["refit curate on Ray"] = "curate-ray"
    seconds = {}
    for label, kind in runs.items():
        if kind == "curate" and whole_curate is not None:
            result, label = whole_curate, f"{label}, the whole input's run above"
        else:
            extra = {"executor": "ray"} if kind == "curate-ray" else {}
            recipe = recipe_for(tmp, kind, sliced, args.workers, tokenizer, **extra)
            result = measure("stock" if kind == "stock" else "curate", recipe, tmp / kind / "wd")
            shutil.rmtree(tmp / kind, ignore_errors=True)
        seconds[kind] = result["seconds"]
        show(f"{label} ({size:.1f} MB)", result | {"mb_per_s_per_core": size / result["seconds"] / args.workers})
    print(f"throughput refit/stock: {seconds['stock'] / seconds['curate']:.2f}x on {size:.1f} MB")
    if args.ray:
        print(f"Ray overhead: {seconds['curate-ray'] / seconds['curate']:.2f}x the local executor's time")


if __name__ == "__main__":
    main()
