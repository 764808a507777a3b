"""Training and evaluation throughput on one GPU: the train stage against a bare torch loop,
with model FLOPs utilisation, and Refit's scorer against lm-evaluation-harness's HF backend.

    benchmarks/bench_gpu.sh                  # one H200, about 8 minutes; prints the figures
    python benchmarks/bench_gpu.py --tiny    # the same steps at toy size on the CPU (checks the script)

Train: a randomly initialised Llama of about 1.2B parameters (24 layers, d_model 2048, 32
query / 8 key-value heads, FFN 5632, vocabulary 32000, sequences of 2048 tokens; throughput
does not depend on training), on the bundled corpora, curated, tokenized and mixed by the
data stages. Both sides run the same micro-batches (the sampler's, --micro-batch sequences)
and the same sequences per optimizer step, in bf16:
  bare   a bare loop: the fp32 model under bf16 autocast, SDPA attention, fused AdamW,
         gradient accumulation and clipping; timed after --warmup steps
  stage  `run_train` with 1 process, strategy ddp (accelerate's bf16 autocast) and fsdp
         (FSDP2's bf16 mixed-precision policy), timed from its own per-step log after the
         same warm-up steps (launch, model loading and the final checkpoint excluded)
MFU = tokens/s x FLOPs per token / 989e12 (the H200's dense bf16 peak), FLOPs per token =
6 x (parameters less the input embedding) + 12 x layers x d_model x seq_len (attention,
PaLM appendix B). Targets: stage >= 0.95x the bare loop, MFU >= 40%.

Eval: items/s scoring the bundled benchmarks (--eval-items per file) with the same model on
the same GPU in bf16: Refit's `Scorer` against `lm_eval.simple_evaluate(model="hf")` on
the task definitions Refit's lm-eval backend writes (the two sides of
benchmarks/bench_evaluate.py, timed once each, model loading included). Needs the lm-eval
extra: pip install -e '.[lm-eval]'.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from bench_evaluate import run_lm_eval, run_refit  # noqa: E402

from refit.flows.demo_base import read_texts, train_tokenizer  # noqa: E402
from refit.stages.core.config import BenchmarkSpec, EvaluateSpec, load_recipe  # noqa: E402
from refit.stages.core.text import read_jsonl  # noqa: E402
from refit.stages.curate.stage import run_curate  # noqa: E402
from refit.stages.evaluate.lm_eval_backend import write_tasks  # noqa: E402
from refit.stages.evaluate.scorer import ScoringSettings  # noqa: E402
from refit.stages.mix.manifest import Manifest  # noqa: E402
from refit.stages.mix.stage import run_mix  # noqa: E402
from refit.stages.tokenize.stage import run_tokenize  # noqa: E402
from refit.stages.train.sampler import Sampler  # noqa: E402
from refit.stages.train.stage import run_train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
H200_BF16_PEAK = 989e12


@dataclass(frozen=True)
class Size:
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq_len: int
    micro_batch: int
    sequences_per_step: int
    steps: int
    warmup: int
    eval_items: int
    eval_batch: int


FULL = Size(24, 2048, 32, 8, 5632, 32000, 2048, 4, 16, 24, 6, 400, 32)
TINY = Size(2, 64, 4, 2, 128, 1024, 64, 2, 4, 8, 3, 20, 8)


def build_base(out: Path, size: Size) -> tuple[int, int]:
    """The random Llama and a BPE tokenizer trained on the bundled corpora; returns
    (parameters, parameters less the input embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [
        t
        for name in ("legacy_python_docs", "new_postgres_docs")
        for t in read_texts(REPO / "datasets" / f"{name}.jsonl.gz")
    ]
    tokenizer = train_tokenizer(texts, vocab_size=min(size.vocab, 8192), out_dir=out)
    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.d_model,
        intermediate_size=size.ffn,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.seq_len,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return model.num_parameters(), model.num_parameters() - model.get_input_embeddings().weight.numel()


def write_recipe(folder: Path, base: Path, size: Size, strategy: str) -> Path:
    tokens = size.steps * size.sequences_per_step * size.seq_len
    recipe = {
        "name": f"bench-{strategy}",
        "workdir": str(folder / "wd"),
        "base_model": {"path": str(base), "pretraining_min_lr": 3e-4},
        "sources": [
            {"name": "python", "paths": [str(REPO / "datasets" / "legacy_python_docs.jsonl.gz")], "role": "legacy"},
            {"name": "postgres", "paths": [str(REPO / "datasets" / "new_postgres_docs.jsonl.gz")], "role": "new"},
        ],
        "curate": {"workers": min(8, os.cpu_count() or 1), "validation_fraction": 0.0},
        "tokenize": {"seq_len": size.seq_len, "workers": min(8, os.cpu_count() or 1)},
        "mixture": {"phases": [{"name": "general", "weights": {"python": 1, "postgres": 1}}], "max_epochs": 100},
        "schedule": {"total_tokens": tokens},
        "train": {
            "micro_batch_size": size.micro_batch,
            "sequences_per_step": size.sequences_per_step,
            "checkpoint_every": size.steps,  # one checkpoint, at the end, outside the timed steps
            "strategy": strategy,
        },
    }
    path = folder / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def bare_loop(recipe, manifest: Manifest, workdir: Path, size: Size, device: str) -> float:
    """Tokens/s of the plain loop over the stage's own micro-batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        recipe.base_model.path, use_safetensors=True, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=recipe.peak_lr,
        betas=recipe.train.adam_betas,
        weight_decay=recipe.train.weight_decay,
        fused=device == "cuda",
    )
    sampler = Sampler(manifest, workdir)
    per_step, micro = manifest.sequences_per_step, size.micro_batch
    chunks = [range(i, min(i + micro, per_step)) for i in range(0, per_step, micro)]
    bf16 = device == "cuda"
    for step in range(size.steps):
        if step == size.warmup:
            if bf16:
                torch.cuda.synchronize()
            start = time.perf_counter()
        for chunk in chunks:
            batch = torch.from_numpy(sampler.batch(step, chunk)).to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=batch, labels=batch).loss
            (loss / len(chunks)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if bf16:
        torch.cuda.synchronize()
    rate = (size.steps - size.warmup) * manifest.tokens_per_step / (time.perf_counter() - start)
    del model, optimizer
    if bf16:
        torch.cuda.empty_cache()
    return rate


def stage_rate(workdir: Path, tokens_per_step: int, warmup: int) -> float:
    log = [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    return (len(log) - warmup) * tokens_per_step / (log[-1]["elapsed"] - log[warmup - 1]["elapsed"])


def evaluation(model: Path, size: Size, folder: Path, device: str) -> None:
    files = []
    for path in sorted((REPO / "datasets" / "benchmarks").glob("*.jsonl")):
        files.append(folder / "bench" / path.name)
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_text("".join(json.dumps(i) + "\n" for i in read_jsonl(path)[: size.eval_items]))
    items = sum(len(read_jsonl(f)) for f in files)
    settings = ScoringSettings.resolve(EvaluateSpec(device=device, batch_size=size.eval_batch))
    start = time.perf_counter()
    run_refit(model, files, settings)
    refit_rate = items / (time.perf_counter() - start)
    print(f"eval  refit Scorer        {refit_rate:8.1f} items/s  ({items} items, {settings.device}, {settings.dtype})")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("eval  lm-eval             not installed: pip install -e '.[lm-eval]'")
        return
    benches = [BenchmarkSpec(name=f.stem, path=str(f), domain="new") for f in files]
    task_dir = write_tasks(benches, folder / "tasks")
    start = time.perf_counter()
    run_lm_eval(model, benches, task_dir, settings)
    harness_rate = items / (time.perf_counter() - start)
    print(f"eval  lm-eval HF backend  {harness_rate:8.1f} items/s  ({settings.device}, {settings.dtype})")
    print(f"eval  ratio refit/lm-eval: {refit_rate / harness_rate:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks every step of the script")
    parser.add_argument("--keep", default=None, help="keep the work folder here (default: a temporary one)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    size = TINY if args.tiny else FULL
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if not args.tiny and device != "cuda":
        sys.exit("no CUDA device: run on a GPU machine, or pass --tiny to check the script on the CPU")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        base = folder / "base"
        parameters, non_embedding = build_base(base, size)
        flops_per_token = 6 * non_embedding + 12 * size.layers * size.d_model * size.seq_len
        print(
            f"model {parameters / 1e6:.1f}M parameters ({size.layers} layers, d_model {size.d_model}, seq "
            f"{size.seq_len}), {size.sequences_per_step} sequences per step in micro-batches of {size.micro_batch}, "
            f"{size.steps} steps ({size.warmup} warm-up), device {device}"
        )
        rates = {}
        for strategy in ("ddp", "fsdp"):
            run_dir = folder / strategy
            run_dir.mkdir(exist_ok=True)
            recipe = load_recipe(write_recipe(run_dir, base, size, strategy))
            workdir = Path(recipe.workdir)
            if strategy == "ddp":  # the data stages once; the fsdp run reads the same shards
                for stage in (run_curate, run_tokenize, run_mix):
                    manifest = stage(recipe, workdir)
                data = workdir
                rates["bare loop"] = bare_loop(recipe, manifest, workdir, size, device)
            else:
                shutil.copytree(data / "tokenize", workdir / "tokenize")
                manifest = run_mix(recipe, workdir)
            run_train(recipe, workdir)
            rates[f"stage {strategy}"] = stage_rate(workdir, manifest.tokens_per_step, size.warmup)
            shutil.rmtree(workdir / "train" / "checkpoints")  # tens of GB at full size
        print(f"seconds so far: {time.time() - started:.0f}")
        for name, rate in rates.items():
            ratio = rate / rates["bare loop"]
            print(
                f"train {name:10s} {rate:10.0f} tokens/s  {ratio:5.2f}x bare  "
                f"MFU {rate * flops_per_token / H200_BF16_PEAK:6.1%} of 989 TFLOPS"
            )
        evaluation(base, size, folder, device)
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
