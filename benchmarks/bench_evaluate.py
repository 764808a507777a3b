"""Benchmark scoring throughput of Refit's scorer against lm-evaluation-harness.

    python benchmarks/bench_evaluate.py [--rounds 2] [--batch-size 16] [--limit N]
                                        [--device auto|cpu|cuda] [--shape demo|1b]

Both sides score the demo benchmarks (datasets/benchmarks/*.jsonl: log-likelihood of every
choice, acc and acc_norm) with the same model, on the same items, on the same device and in
the same dtype (as the evaluate stage resolves `evaluate.device`: auto is CUDA when present,
bf16 there, fp32 on the CPU), with the same batch size:
  lm-eval  `lm_eval.simple_evaluate` with model "hf" on the checkpoint directory and the
           task definitions Refit's lm-eval backend writes (stages/evaluate/lm_eval_backend.py)
  refit    `refit.stages.evaluate.scorer.Scorer` on the same directory, `choice_loglikelihoods`
           then `evaluate.choice_metrics` per file
Each timed run starts from the checkpoint on disk (model loading, tokenization and
bookkeeping included on both sides). The model is a randomly initialised Llama the size of
the demo base model (flows/demo_base.py), or with --shape 1b of about 1.2B parameters
(24 layers, d_model 2048; for a GPU), with a tokenizer trained here on the demo corpora:
throughput does not depend on training. One untimed warm-up of each side, then the sides
alternate (lm-eval, refit, lm-eval, refit, ...) since this machine's speed drifts.
Prints items/s for each and the ratio refit / lm-eval (target >= 1.0x), the part of each
run spent in the log-likelihood loop itself (Refit `Scorer.continuation_logprobs`, the
harness's `HFLM._loglikelihood_tokens`; the rest is loading, tokenizing, bookkeeping), and
checks that both sides agree on every benchmark's acc and acc_norm.
Needs the lm-eval extra: pip install -e '.[lm-eval]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from refit.flows.demo_base import DemoBaseSpec, read_texts, train_tokenizer  # noqa: E402
from refit.stages.core.config import BenchmarkSpec, EvaluateSpec  # noqa: E402
from refit.stages.core.text import read_jsonl  # noqa: E402
from refit.stages.evaluate.lm_eval_backend import task_name, write_tasks  # noqa: E402
from refit.stages.evaluate.scorer import Scorer, ScoringSettings, context_length  # noqa: E402
from refit.stages.evaluate.stage import choice_metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((REPO / "datasets" / "benchmarks").glob("*.jsonl"))
SHAPES = {
    "demo": DemoBaseSpec(),
    "1b": dataclasses.replace(DemoBaseSpec(), hidden_size=2048, intermediate_size=5632, layers=24, heads=16),
}


def build_model(out: Path, spec: DemoBaseSpec = DemoBaseSpec()) -> int:
    """A random Llama with the demo base model's shape, and a BPE tokenizer of its vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [
        t
        for name in ("legacy_python_docs", "new_postgres_docs")
        for t in read_texts(REPO / "datasets" / f"{name}.jsonl.gz")
    ]
    tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size, out_dir=out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return model.num_parameters()


class Stopwatch:
    """Accumulates the time spent in one method of a class while installed (`with`)."""

    def __init__(self, cls, name: str):
        self.cls, self.name, self.seconds = cls, name, 0.0

    def __enter__(self):
        original = self.original = getattr(self.cls, self.name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(self.cls, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.cls, self.name, self.original)


def run_refit(model: Path, files: list[Path], settings: ScoringSettings) -> dict[str, dict[str, float]]:
    scorer = Scorer(model, model, settings.batch_size, device=settings.device, dtype=settings.dtype)
    results = {}
    for path in files:
        items = read_jsonl(path)
        scores = choice_metrics(items, scorer.choice_loglikelihoods(items))
        results[path.stem] = {metric: float(values.mean()) for metric, values in scores.items()}
    scorer.release()
    return results


def run_lm_eval(
    model: Path, benches: list[BenchmarkSpec], task_dir: Path, settings: ScoringSettings
) -> dict[str, dict[str, float]]:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoConfig

    model_args = {
        "pretrained": str(model),
        "dtype": settings.dtype,
        "add_bos_token": False,
        "max_length": context_length(AutoConfig.from_pretrained(model)),
    }
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[task_name(b) for b in benches],
        device=settings.device,
        batch_size=settings.batch_size,
        log_samples=False,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    return {
        b.name: {metric: output["results"][task_name(b)][f"{metric},none"] for metric in ("acc", "acc_norm")}
        for b in benches
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each benchmark (default: all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    args = parser.parse_args()
    settings = ScoringSettings.resolve(EvaluateSpec(device=args.device, batch_size=args.batch_size))
    logging.disable(logging.WARNING)  # the harness logs every task and request at INFO/WARNING
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        parameters = build_model(model, SHAPES[args.shape])
        files = []
        for path in BENCHMARKS:  # the same items on both sides
            files.append(tmp / "bench" / path.name)
            files[-1].parent.mkdir(exist_ok=True)
            files[-1].write_text("".join(json.dumps(i) + "\n" for i in read_jsonl(path)[: args.limit]))
        benches = [BenchmarkSpec(name=f.stem, path=str(f), domain="new") for f in files]
        task_dir = write_tasks(benches, tmp / "tasks")
        items = sum(len(read_jsonl(f)) for f in files)
        requests = sum(len(i["choices"]) for f in files for i in read_jsonl(f))
        from lm_eval.models.huggingface import HFLM

        runs = {
            "lm-eval": lambda: run_lm_eval(model, benches, task_dir, settings),
            "refit": lambda: run_refit(model, files, settings),
        }
        loops = {"lm-eval": (HFLM, "_loglikelihood_tokens"), "refit": (Scorer, "continuation_logprobs")}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        in_loop: dict[str, list[float]] = {name: [] for name in runs}
        results = {name: run() for name, run in runs.items()}  # warm-up: imports, dataset cache, page cache
        for _ in range(args.rounds):
            for name, run in runs.items():
                with Stopwatch(*loops[name]) as loop:
                    start = time.perf_counter()
                    results[name] = run()
                    seconds[name].append(time.perf_counter() - start)
                in_loop[name].append(loop.seconds)
    print(
        f"model {parameters / 1e6:.2f}M parameters (Llama, {args.shape} shape); {items} items "
        f"({requests} choices) in {len(files)} benchmarks, batch {args.batch_size}, {settings.device} "
        f"{settings.dtype}, {torch.get_num_threads()} threads, {args.rounds} round(s) alternating"
    )
    rates = {}
    for name, times in seconds.items():
        rates[name] = items / float(np.mean(times))
        print(
            f"{name:8s} {rates[name]:8.1f} items/s   (runs: {', '.join(f'{t:.2f}s' for t in times)}; "
            f"log-likelihood loop {', '.join(f'{t:.2f}s' for t in in_loop[name])})"
        )
    print(f"ratio refit/lm-eval: {rates['refit'] / rates['lm-eval']:.2f}x (target >= 1.0x)")
    for bench in results["refit"]:
        same = all(results["refit"][bench][m] == results["lm-eval"][bench][m] for m in ("acc", "acc_norm"))
        print(
            f"  {bench}: refit acc {results['refit'][bench]['acc']:.4f} acc_norm "
            f"{results['refit'][bench]['acc_norm']:.4f}"
            f" | lm-eval acc {results['lm-eval'][bench]['acc']:.4f} acc_norm "
            f"{results['lm-eval'][bench]['acc_norm']:.4f}"
            f" {'same' if same else 'DIFFERENT'}"
        )


if __name__ == "__main__":
    main()
