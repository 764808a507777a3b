"""A model larger than a toy on the CPU: a ~100M-parameter Llama continued by the train stage
with FSDP over 2 processes and activation checkpointing, measured against the capacity plan.

    python benchmarks/bench_train_100m.py [--steps 300] [--micro-batch 8] [--sequences-per-step 16]

The model: a randomly initialised Llama (hidden 768, 12 layers of 12 heads, gated MLP of 2304,
untied embeddings, the vocabulary of the demo tokenizer: 98.3M parameters; throughput and memory
do not depend on the weights), saved with `save_pretrained` (safetensors) with the demo base
model's tokenizer. It is the recipe's base_model for deployments/demo.yaml with its data (the
demo's sources, sequences of tokenize.seq_len 256 tokens) and its micro-batch of 8 and 16
sequences per step (one micro-batch per process and step), changed only in: train.strategy
fsdp, num_processes 2, activation_checkpointing on, one checkpoint (after the last step),
no validation pass, and a schedule of --steps steps. `run_train` trains it through `accelerate
launch` (gloo, one torch thread per process on 2 cores).

Measured:
  tokens/s   from the stage's own per-step log (metrics.jsonl `elapsed`), steps after the
             first 3 (set-up, warm-up); also the median of the per-step `tokens_per_s`
  peak RSS   of each training process (rank 0, rank 1; found by their command line among
             the descendants of this process), read from the kernel's high-water mark VmHWM
             in /proc/<pid>/status, which counts every page the process ever held resident, so
             a poll every 0.5 s misses nothing that happened between polls; three windows:
               set-up   VmHWM when the first step's line appears: loading the full fp32 model
                        from safetensors, sharding it, the first step
               steps    the mark is reset (`echo 5 > /proc/<pid>/clear_refs`) once the warm-up
                        steps are logged, then read at the last poll before the final step's
                        line: the training steps alone (no load, no checkpoint, no export)
               run      the largest VmHWM read, before the reset and at the last poll before
                        the process exited: everything, the final DCP checkpoint and the export
                        (rank 0 gathers the whole model) included
             Where the reset is refused the steps' figure is the largest VmRSS polled instead.
  baseline   RSS of a fresh process that only imported torch and transformers (and one that
             also imported the training loop's modules: accelerate, torch.distributed, refit),
             since RSS counts the interpreter and the libraries' resident pages, which the plan
             does not: compare RSS minus baseline to the plan.
Beside them the capacity plan of the same recipe on this machine (`plan_for`, as `refit plan`
prints it): memory per process and its parts against the peak RSS, and tokens/s at the plan's
assumed MFU of its assumed CPU peak (1e11 FLOP/s per core, the cores shared by the processes)
against the measured rate, with the utilisation the measurement implies against that peak
(the plan's FLOPs per token: 8 per parameter with checkpointing) and as model FLOPs (6 per
parameter, PaLM), and against a measured fp32 matmul peak of this machine (all cores).

RSS is what the process holds from the system, the tensors the plan counts plus what glibc's
allocator keeps of freed ones: the training processes inherit this process's environment, so
`MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_train_100m.py ...` (every allocation of
128 KiB or more mapped on its own and returned when freed, instead of the default threshold
that rises to 32 MiB) shows how much of the RSS is the allocator's; the MALLOC_ variables in
effect are printed.

Duration: about 22 s per step on this 2-core machine (measured with a test suite running
beside it), plus about 35 s for the data, the launch, loading, the final checkpoint and the
export: 300 steps take about two hours. Prerequisites: none beyond the installed environment. With `make demo` run, its
curated documents, shards and tokenizer (runs/demo, runs/demo-base) are reused; without, the
demo tokenizer is trained as `refit demo` trains it and the demo's sources are curated and
tokenized into the temporary folder (about 15 s). About 2 GB of disk in the temporary folder
(model, checkpoint, export). The machine should be otherwise idle: both cores are used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("LOGURU_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from bench_train import matmul_peak  # noqa: E402  (this folder is on sys.path as the script's)

from refit.flows.demo_base import DemoBaseSpec, read_texts, train_tokenizer  # noqa: E402
from refit.flows.report import format_capacity  # noqa: E402
from refit.stages.core.capacity import base_shape, flops_per_token, plan_for  # noqa: E402
from refit.stages.core.config import parse_recipe  # noqa: E402
from refit.stages.curate.stage import run_curate  # noqa: E402
from refit.stages.mix.stage import run_mix  # noqa: E402
from refit.stages.tokenize.stage import run_tokenize  # noqa: E402
from refit.stages.train.stage import WORKER, run_train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "deployments" / "demo.yaml"
LEGACY_CORPUS = REPO / "datasets" / "legacy_python_docs.jsonl.gz"  # what `refit demo` trains its tokenizer on
WARMUP = 3  # steps left out of the rate, and before the steps' memory window
POLL_SECONDS = 0.5
MiB = 2**20

# hidden 768, 12 layers x 12 heads (head_dim 64), gated MLP 2304 (3 x hidden), untied embeddings
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 768, 12, 12, 2304


def build_model(out: Path, tokenizer_from: Path | None) -> int:
    """The random Llama with the demo tokenizer (copied from tokenizer_from, or trained as
    `refit demo` trains it) into out; returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        tokenizer.save_pretrained(out)
    else:
        tokenizer = train_tokenizer(read_texts(LEGACY_CORPUS), DemoBaseSpec.vocab_size, out)
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # the tokenizer's, padded to a multiple of 64 as is usual
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)  # safetensors
    return model.num_parameters()


def make_recipe(base: Path, workdir: Path, steps: int, micro_batch: int, sequences_per_step: int):
    """deployments/demo.yaml with the model as its base and the train section of this benchmark."""
    data = yaml.safe_load(RECIPE.read_text())
    data["workdir"] = str(workdir)
    data["base_model"] = {"path": str(base)}
    data["mixture"]["max_epochs"] = 1000  # many steps draw the small sources many times: no warning
    data["schedule"]["total_tokens"] = steps * sequences_per_step * data["tokenize"]["seq_len"]
    data["train"] = {
        "micro_batch_size": micro_batch,
        "sequences_per_step": sequences_per_step,
        "strategy": "fsdp",
        "num_processes": 2,
        "activation_checkpointing": True,
        "checkpoint_every": steps,  # one checkpoint, after the last step's line: outside the timed steps
        "validation_tokens": 0,
    }
    return parse_recipe(yaml.safe_dump(data), RECIPE)  # the demo's relative paths, from deployments/


def prepare_data(recipe, demo: Path | None) -> None:
    """The curated documents and the shards in the recipe's workdir: the demo's, or made here."""
    workdir = Path(recipe.workdir)
    if demo is not None:
        for stage in ("curate", "tokenize"):  # train reads both (its validation rows, the shards)
            shutil.copytree(demo / stage, workdir / stage)
    else:
        from loguru import logger

        logger.disable("datatrove")  # its pipeline summaries, at INFO whatever the level asked
        run_curate(recipe, workdir)
        run_tokenize(recipe, workdir)
    run_mix(recipe, workdir)


def _status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/<pid>/status, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(Vm\w+|Rss\w+):\s+(\d+) kB", text, re.M)}


@dataclass
class Process:
    pid: int
    rank: int
    setup: int = 0  # VmHWM when the first step's line appeared
    steps: int = 0  # VmHWM since the reset, at the last poll before the final step's line
    run: int = 0  # the largest VmHWM read, before and after the reset
    steps_rss: list[int] = field(default_factory=list)  # VmRSS polled in the steps' window
    steps_anon: list[int] = field(default_factory=list)  # RssAnon polled in the steps' window
    reset: bool | None = None  # whether the high-water mark was reset after the warm-up


class MemoryPoller(threading.Thread):
    """Polls the training processes' memory while `run_train` waits for them (see the docstring)."""

    def __init__(self, metrics: Path, total_steps: int):
        super().__init__(daemon=True)
        self.metrics, self.total_steps = metrics, total_steps
        self.processes: dict[int, Process] = {}
        self.done = threading.Event()

    def _lines(self) -> int:
        try:
            return self.metrics.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def _training_processes(self) -> list[psutil.Process]:
        found = []
        for child in psutil.Process().children(recursive=True):
            try:
                command = child.cmdline()
                if WORKER in command and "refit.stages.core.lifeline" not in command:  # not the launcher
                    if child.pid not in self.processes:
                        rank = int(child.environ().get("RANK", len(self.processes)))
                        self.processes[child.pid] = Process(child.pid, rank)
                    found.append(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def poll(self) -> None:
        lines = self._lines()  # before the reads: a line seen here was written before them
        for child in self._training_processes():
            process = self.processes[child.pid]
            try:
                status = _status(child.pid)
                process.run = max(process.run, status["VmHWM"])  # the mark is reset once: the largest seen
                if lines >= WARMUP and process.reset is None:
                    try:
                        Path(f"/proc/{child.pid}/clear_refs").write_text("5")
                        process.reset = True
                    except OSError:
                        process.reset = False
                    status = _status(child.pid)
            except (FileNotFoundError, ProcessLookupError):
                continue  # it has exited
            process.run = max(process.run, status["VmHWM"])
            if lines == 0:
                process.setup = status["VmHWM"]
            if WARMUP <= lines < self.total_steps:
                process.steps = status["VmHWM"]
                process.steps_rss.append(status["VmRSS"])
                process.steps_anon.append(status.get("RssAnon", 0))

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(POLL_SECONDS)


def baseline_rss() -> dict[str, dict[str, int]]:
    """VmRSS and VmHWM of fresh processes after the imports alone."""
    probe = (
        "import re, sys\n"
        "def mark(name):\n"
        "    s = open('/proc/self/status').read()\n"
        "    print(name, *(int(re.search(k + r':\\s+(\\d+)', s).group(1)) * 1024 for k in ('VmRSS', 'VmHWM')))\n"
        "import torch, transformers\n"
        "from transformers import LlamaForCausalLM\n"
        "mark('torch')\n"
        "import accelerate, torch.distributed.checkpoint, refit.stages.train.loop\n"
        "mark('loop')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return {name: {"rss": int(rss), "hwm": int(hwm)} for name, rss, hwm in (line.split() for line in out.splitlines())}


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward pass (demo: 8)")
    parser.add_argument("--sequences-per-step", type=int, default=16, help="all processes together (demo: 16)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    args = parser.parse_args()
    if args.steps <= WARMUP + 1:
        sys.exit(f"--steps must be above {WARMUP + 1}: the first {WARMUP} are left out of the measurement")
    logging.basicConfig(level=logging.WARNING)
    demo_recipe = parse_recipe(RECIPE.read_text(), RECIPE, check_files=False)
    demo = Path(demo_recipe.workdir)
    demo_base = Path(demo_recipe.base_model.path)
    reuse = (demo / "mix" / "_SUCCESS.json").exists() and (demo_base / "tokenizer.json").is_file()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        parameters = build_model(folder / "base", demo_base if reuse else None)
        recipe = make_recipe(folder / "base", folder / "wd", args.steps, args.micro_batch, args.sequences_per_step)
        workdir = Path(recipe.workdir)
        prepare_data(recipe, demo if reuse else None)
        data_seconds = time.time() - started
        plan = plan_for(recipe, base_shape(recipe))
        poller = MemoryPoller(workdir / "train.tmp" / "metrics.jsonl", args.steps)
        poller.start()
        train_started = time.time()
        try:
            run_train(recipe, workdir)
        finally:
            poller.done.set()
            poller.join()
        train_seconds = time.time() - train_started
        lines = [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = args.sequences_per_step * recipe.tokenize.seq_len
    timed = lines[-1]["elapsed"] - lines[WARMUP - 1]["elapsed"]
    rate = (len(lines) - WARMUP) * tokens_per_step / timed
    median_rate = statistics.median(line["tokens_per_s"] for line in lines[WARMUP:])
    baselines = baseline_rss()
    matmul = matmul_peak()
    processes = sorted(poller.processes.values(), key=lambda p: p.rank)
    shape, setup, needs = plan.shape, plan.setup, plan.memory
    n = setup.num_processes
    per_token = flops_per_token(shape, setup)
    model_per_token = 6 * (shape.matmul_parameters + 2 * shape.layers * shape.attention_width * setup.seq_len)
    peak_all = plan.device.peak_flops * n

    print(
        f"model: Llama, hidden {HIDDEN}, {LAYERS} layers x {HEADS} heads, MLP {INTERMEDIATE}, vocabulary "
        f"{shape.vocab}, untied: {parameters:,} parameters ({parameters / 1e6:.1f}M)"
    )
    print(
        f"run: {args.steps} steps x {tokens_per_step} tokens ({args.sequences_per_step} sequences of "
        f"{recipe.tokenize.seq_len}, micro-batches of {args.micro_batch}, {setup.accumulation} per process and "
        f"step), fsdp over {n} processes, activation checkpointing, {os.cpu_count()} cores; data "
        f"{'reused from ' + str(demo) if reuse else 'curated and tokenized here'}"
    )
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"allocator: glibc, {', '.join(f'{k}={v}' for k, v in malloc.items()) or 'no MALLOC_ variable set'}")
    print(
        f"wall: data and model {data_seconds:.0f} s, run_train {train_seconds:.0f} s: the steps "
        f"{lines[-1]['elapsed']:.0f} s (the first {lines[0]['elapsed']:.0f} s), the rest (launch, loading the "
        f"model, the final checkpoint, the export, exit) {train_seconds - lines[-1]['elapsed']:.0f} s"
    )
    print(f"seconds per step after the warm-up: {timed / (len(lines) - WARMUP):.2f}")
    print()
    print("the capacity plan of this recipe on this machine (as `refit plan` prints it):")
    print(format_capacity(plan))
    print()
    print("memory per process: plan against measured")
    print(
        f"  plan: parameters {mib(needs.parameters)}, gradients {mib(needs.gradients)}, optimizer "
        f"{mib(needs.optimizer)}, activations {mib(needs.activations)}; peak {mib(needs.total)}"
    )
    imported = {"torch": "torch and transformers", "loop": "those and the training loop's modules"}
    for name, figures in baselines.items():
        print(f"  baseline: a process that imported {imported[name]}: RSS {mib(figures['rss'])}")
    base = baselines["loop"]["rss"]
    if not processes:
        print("  no training process was found among this process's descendants: no RSS measured")
    for p in processes:
        window = "VmHWM" if p.reset else "max VmRSS polled (the mark could not be reset)"
        steps = p.steps if p.reset else max(p.steps_rss, default=0)
        print(f"  rank {p.rank} (pid {p.pid}):")
        print(f"    peak RSS, steps {WARMUP} to the last ({window}): {mib(steps)}; minus baseline {mib(steps - base)}")
        print(f"      = {(steps - base) / needs.total:.2f}x the plan's peak; RSS itself {steps / needs.total:.2f}x")
        if p.steps_anon:
            print(f"    anonymous RSS polled in the steps: max {mib(max(p.steps_anon))}, min {mib(min(p.steps_anon))}")
        print(f"    peak RSS, set-up and first step (loading the full fp32 model, sharding it): {mib(p.setup)}")
        print(f"    peak RSS, whole run (the final checkpoint and the export included): {mib(p.run)}")
    print()
    print("throughput: plan against measured, all processes together")
    print(
        f"  plan: {plan.tokens_per_second * n:,.0f} tokens/s = {plan.mfu:.0%} x {peak_all / 1e9:.0f} GFLOP/s "
        f"({plan.device.peak_from}) / {per_token / 1e6:.0f} MFLOP per token (8 per parameter with checkpointing)"
    )
    print(
        f"  measured: {rate:,.1f} tokens/s over steps {WARMUP}-{len(lines) - 1} (median of steps "
        f"{median_rate:,.1f}) = {rate / (plan.tokens_per_second * n):.2f}x the plan"
    )
    print(
        f"  implied utilisation of the plan's peak: {rate * per_token / peak_all:.1%} as the plan counts FLOPs "
        f"(assumed {plan.mfu:.0%}); MFU {rate * model_per_token / peak_all:.1%} (6 per parameter)"
    )
    print(
        f"  against a measured fp32 matmul peak of {matmul / 1e9:.0f} GFLOP/s (both cores, this moment): "
        f"{rate * per_token / matmul:.1%} as the plan counts, MFU {rate * model_per_token / matmul:.1%}; the plan "
        f"assumes {peak_all / matmul:.2f}x that peak"
    )
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
