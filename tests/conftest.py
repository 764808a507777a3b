"""Shared fixtures and helpers: tiny tokenizers and causal LMs built in the test (never
downloaded), the bundled data, recipes, prepared runs and probes that several test modules use.

Fixtures are found by pytest; plain helpers and constants are imported as `from conftest
import X`. Test modules never import from each other (tests/test_suite_layout.py checks it).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a hub, in any test
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gzip  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from refit.stages.core.text import word_ngrams  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO / "datasets"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def own_refit_home(tmp_path_factory) -> None:
    """A `refit ui` server the developer runs (found through ~/.refit) must not receive the
    tests' runs: they would record into it instead of on the temporary servers tested here."""
    os.environ["REFIT_HOME"] = str(tmp_path_factory.mktemp("refit-home"))


# ----------------------------------------------------------------------------- tiny models
# A tokenizer and 2-layer models built from a few sentences: every model test runs offline in seconds.

TEXT = (
    "Continued pretraining reuses a trained model. The learning rate decays along a cosine. "
    "SELECT name FROM users WHERE id = 1; CREATE TABLE t (x integer); "
    "def add(a, b):\n    return a + b\n"
) * 20


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 300) trained here on a few sentences."""
    from refit.flows.demo_base import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([TEXT], vocab_size=300, out_dir=out)
    return out


def _tiny_config(arch: str, vocab_size: int, eos: int):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=eos,
            eos_token_id=eos,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=eos, eos_token_id=eos
    )


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer causal LM in HF format (safetensors) with the tiny tokenizer.

    Parametrised over two architectures so that nothing in Refit is Llama-only."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(request.param, len(tokenizer), tokenizer.eos_token_id))
    out = tmp_path_factory.mktemp(f"model-{request.param}")
    model.save_pretrained(out, safe_serialization=True)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(tiny_tokenizer_dir / name, out / name)
    return out


# ----------------------------------------------------------------------------- bundled data
# Real documents from datasets/: LEGACY and NEW are 40 documents each that barely overlap, so
# that each test plants its own duplicates and near-duplicates.


def rows(path: Path) -> list[dict]:
    """The records of a JSONL file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def distinct(docs: list[dict], count: int) -> list[dict]:
    """Real documents sharing few word 5-grams with each other (the bundled corpora hold
    some near-duplicates of their own, which would blur what each test plants)."""
    chosen, seen = [], set()
    for doc in docs:
        grams = word_ngrams(doc["text"], 5)
        if 1200 < len(doc["text"]) < 3000 and len(grams & seen) < 0.1 * len(grams):
            chosen.append(doc)
            seen |= grams
        if len(chosen) == count:
            return chosen
    raise AssertionError("not enough distinct documents")


LEGACY = distinct(rows(DATASETS / "legacy_python_docs.jsonl.gz"), 40)
NEW = distinct(rows(DATASETS / "new_postgres_docs.jsonl.gz"), 40)
# one well-formed BBQ item (ambiguous context, answer 2 unknown): the probe-file tests change one field at a time
BBQ_ITEM = {
    "example_id": 0,
    "question_polarity": "neg",
    "context_condition": "ambig",
    "category": "Age",
    "answer_info": {"ans0": ["old"], "ans1": ["nonOld"], "ans2": ["unknown"]},
    "additional_metadata": {"stereotyped_groups": ["old"]},
    "context": "Two people.",
    "question": "Who?",
    "ans0": "The old one",
    "ans1": "The young one",
    "ans2": "Unknown",
    "label": 2,
}


def jaccard(a: str, b: str) -> float:
    x, y = word_ngrams(a, 5), word_ngrams(b, 5)
    return len(x & y) / len(x | y)


def edited(text: str, seed: int) -> str:
    """A copy with words replaced one at a time until its word 5-gram Jaccard falls to ~0.9."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), len(words)):
        words[i] = "edited"
        if jaccard(text, " ".join(words)) < 0.9:
            break
    copy = " ".join(words)
    assert 0.85 < jaccard(text, copy) < 0.9
    return copy


# ----------------------------------------------------------------------------- recipes and inputs
# BASE_RECIPE and write_recipe: a minimal recipe for schema and gate tests (no real data);
# make_recipe: a runnable one over files the test writes with write_jsonl.

BASE_RECIPE = {
    "name": "r1",
    "base_model": {"path": "base", "pretraining_min_lr": 3e-4},
    "sources": [
        {"name": "old", "paths": ["data/old.jsonl"], "role": "legacy"},
        {"name": "new", "paths": ["data/*.jsonl"], "role": "new"},
        {"name": "qa", "paths": ["data/qa.jsonl"], "role": "qa"},
    ],
    "schedule": {"total_tokens": "2M"},
}


def write_recipe(folder: Path, recipe: dict | str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_jsonl(path: Path, lines: list, opener=open) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as out:
        for line in lines:
            out.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def make_recipe(tmp_path: Path, sources: list[dict], sections: dict | None = None, **curate) -> Path:
    (tmp_path / "base").mkdir(exist_ok=True)
    (tmp_path / "base" / "config.json").write_text("{}")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(
        json.dumps(
            {
                "id": "q1",
                "query": "The quick brown fox jumps over the lazy dog while the cat",
                "choices": [" sleeps on the warm mat", " runs"],
                "gold": 0,
            }
        )
        + "\n"
    )
    recipe = {
        "name": "t",
        "base_model": {"path": "base", "pretraining_min_lr": 1e-3},
        "sources": sources,
        "curate": {"workers": 1, "min_chars": 20, "validation_fraction": 0.1, **curate},
        "schedule": {"total_tokens": 100000},
        "tokenize": {"seq_len": 64},
        "train": {"micro_batch_size": 2, "sequences_per_step": 4},
        "evaluate": {"benchmarks": [{"name": "b", "path": "bench.jsonl", "domain": "new"}]},
        **(sections or {}),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ----------------------------------------------------------------------------- prepared runs
# Tiny two-source runs with the stages before the one under test already done.

# one benchmark item cannot show a gain beyond noise
LENIENT = {"min_average_gain": -1.0}


def prepare(
    tmp_path: Path,
    model_dir: Path,
    max_lr: float = 3e-3,
    validation_fraction: float = 0.0,
    gates: dict | None = None,
    steps: int = 20,
    run_data_stages: bool = True,
    new_texts: list[str] | None = None,
    safety: dict | None = None,
    held_out_docs: int = 0,
    **train,
) -> tuple[Path, Path]:
    """A two-source recipe (old: legacy, new: new; new_texts replace the new documents), data
    stages run; safety: the recipe's evaluate.safety section; held_out_docs: that many further
    documents of each source as its validation_paths (the training documents stay the same)."""
    from refit.stages.core.config import load_recipe
    from refit.stages.curate.stage import run_curate
    from refit.stages.mix.stage import run_mix
    from refit.stages.tokenize.stage import run_tokenize

    write_jsonl(
        tmp_path / "data" / "old.jsonl", [{"id": f"o{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:20])]
    )
    new_texts = new_texts or [d["text"] for d in NEW[:20]]
    write_jsonl(tmp_path / "data" / "new.jsonl", [{"id": f"n{i}", "text": t} for i, t in enumerate(new_texts)])
    if safety is None:  # small probes: tests of other stages only need them to run
        safety = {"crows_pairs_size": 40, "bbq_size": 40, "neutral_prompts": 4, "prompts_per_source": 2}
    evaluate = {"benchmarks": [{"name": "b", "path": "bench.jsonl", "domain": "new"}], "safety": safety}
    sources = [
        {"name": "old", "paths": ["data/old.jsonl"], "role": "legacy"},
        {"name": "new", "paths": ["data/new.jsonl"], "role": "new"},
    ]
    for source, docs in zip(sources, (LEGACY, NEW)) if held_out_docs else ():
        name = source["name"]
        held_out = [{"id": f"{name}-v{i}", "text": d["text"]} for i, d in enumerate(docs[20 : 20 + held_out_docs])]
        source["validation_paths"] = [str(write_jsonl(tmp_path / "data" / f"{name}-validation.jsonl", held_out))]
    path = make_recipe(
        tmp_path,
        sources,
        sections={
            "base_model": {"path": str(model_dir), "pretraining_min_lr": max_lr},
            "tokenize": {"seq_len": 32, "workers": 1},
            "mixture": {
                "phases": [
                    {"name": "general", "weights": {"old": 1, "new": 1}},
                    {"name": "late", "lr_below": 0.5, "weights": {"old": 1, "new": 3}},
                ]
            },
            "schedule": {"total_tokens": steps * 4 * 32},
            # 8 held-out rows scored at each checkpoint: the default 32768 tokens cost a tiny run more than training
            "train": {"micro_batch_size": 2, "sequences_per_step": 4, "checkpoint_every": 4, "validation_tokens": 256}
            | train,
            "gates": gates or {},
            "evaluate": evaluate,
            "publish": {"registry": str(tmp_path / "registry"), "model_name": "tiny"},
        },
        validation_fraction=validation_fraction,
    )
    recipe = load_recipe(path)
    workdir = tmp_path / "wd"
    for stage in (run_curate, run_tokenize, run_mix) if run_data_stages else ():
        stage(recipe, workdir)
    return path, workdir


def train_variant(path: Path, name: str, **train) -> Path:
    """A copy of the recipe beside it (same relative paths) with other train settings."""
    data = yaml.safe_load(path.read_text())
    data["train"].update(train)
    out = path.with_name(name)
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory, tiny_model_dir) -> Path:
    """The folder of one tiny run per architecture trained through the train stage, with 30% of
    the documents held out: tests get copies of it (`trained`)."""
    from refit.stages.core.config import load_recipe
    from refit.stages.train.stage import run_train

    root = tmp_path_factory.mktemp("trained")
    path, workdir = prepare(root, tiny_model_dir, validation_fraction=0.3)
    run_train(load_recipe(path), workdir)
    return root


@pytest.fixture
def trained(tmp_path, trained_once) -> tuple[Path, Path]:
    """(recipe path, workdir) of a copy of the trained run, the test's to change: ready for
    evaluate and audit. (Stages read what came before through markers holding relative paths,
    so the copy is as done as the original.)"""
    copy = tmp_path / "run"
    shutil.copytree(trained_once, copy)
    recipe = copy / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(trained_once), str(copy)))  # its registry
    return recipe, copy / "wd"


@pytest.fixture
def curated(tmp_path, tiny_tokenizer_dir):
    """(recipe, workdir, recipe path) of two curated sources of 30 documents each, nothing held
    out, ready for tokenize (shards of 40 rows, 2 workers) and mix."""
    from refit.stages.core.config import load_recipe
    from refit.stages.curate.stage import run_curate

    write_jsonl(
        tmp_path / "data" / "old.jsonl", [{"id": f"o{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:30])]
    )
    write_jsonl(tmp_path / "data" / "new.jsonl", [{"id": f"n{i}", "text": d["text"]} for i, d in enumerate(NEW[:30])])
    path = make_recipe(
        tmp_path,
        [
            {"name": "old", "paths": ["data/old.jsonl"], "role": "legacy"},
            {"name": "new", "paths": ["data/new.jsonl"], "role": "new"},
        ],
        sections={
            "tokenizer": str(tiny_tokenizer_dir),
            "tokenize": {"seq_len": 64, "rows_per_shard": 40, "workers": 2},
            "mixture": {
                "phases": [
                    {"name": "general", "weights": {"old": 1, "new": 1}},
                    {"name": "qa", "lr_below": 0.2, "weights": {"old": 1, "new": 3}},
                ]
            },
        },
        validation_fraction=0.0,
    )
    recipe = load_recipe(path)
    run_curate(recipe, tmp_path / "wd")
    return recipe, tmp_path / "wd", path


def metrics(workdir: Path, folder: str = "train") -> list[dict]:
    """The per-step log of a finished run (train/), or of one in progress or failed (train.tmp/)."""
    return [json.loads(line) for line in (workdir / folder / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- processes
# What runs outside the test's process: training ranks, servers' ports, and a lock held by another process.


def workdir_processes(workdir: Path, program: str = "") -> list[int]:
    """PIDs of live processes whose command line names this workdir (and `program`, if given).
    A process whose exit has begun may already show an empty command line: see `wait_exited`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if program in cmdline and str(workdir) in cmdline and not exited(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def training_processes(workdir: Path) -> list[int]:
    """PIDs of the live training processes (ranks) working in this workdir."""
    return workdir_processes(workdir, "refit.stages.train.loop")


def exited(pid: int) -> bool:
    """Whether every thread of process `pid` has exited (gone, or zombies): only then are its
    open files, locks included, closed. Its first thread can be a zombie while others still exit."""
    try:
        threads = list((Path("/proc") / str(pid) / "task").iterdir())
        return all("State:\tZ" in (thread / "status").read_text() for thread in threads)
    except OSError:  # gone, or going while read
        return True


def wait_exited(pids: list[int], seconds: float = 10) -> list[int]:
    """Wait for every one of `pids` to exit; those that have not within `seconds`."""
    deadline = time.time() + seconds
    while (left := [pid for pid in pids if not exited(pid)]) and time.time() < deadline:
        time.sleep(0.05)
    return left


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on (now)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HOLD_LOCK = (
    "import sys, time; from refit.stages.core.lock import workdir_lock\n"
    "with workdir_lock(sys.argv[1], 'refit run demo'):\n    print('held', flush=True); time.sleep(600)"
)


def hold_lock(workdir: Path) -> subprocess.Popen:
    """Another process holding the workdir's lock as `refit run demo`, until it is killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


# ----------------------------------------------------------------------------- training runs
# What tests/train/test_train.py and tests/train/test_train_scale.py both read: the held-out
# rows, the validation losses, and a stage killed at a step.

# 4 more documents of each source held out (the training documents stay those of the other tests),
# 65 rows of them scored at each checkpoint: 33 of old, 32 of new, and under 2 processes 33 against
# 32 rows, so one process makes a forward pass that counts for nothing
HELD_OUT = {"held_out_docs": 4, "validation_tokens": 65 * 32}


def held_out_loss(model, workdir: Path) -> float:
    """The mean token loss of the held-out rows the run scored, one row at a time, by model (a causal LM)."""
    import torch

    from refit.stages.core.shards import read_shard

    rows = torch.from_numpy(read_shard(workdir / "train" / "validation.arrow").astype("int64"))
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=row[None], labels=row[None]).loss.item() for row in rows) / len(rows)


def validation_losses(workdir: Path) -> dict[int, float]:
    """The validation loss logged at each checkpoint, by checkpoint step."""
    return {m["step"] + 1: m["val_loss"] for m in metrics(workdir) if "val_loss" in m}


def final_model_loss(workdir: Path) -> float:
    from transformers import AutoModelForCausalLM

    return held_out_loss(AutoModelForCausalLM.from_pretrained(workdir / "train" / "final"), workdir)


def kill_at_step(
    path: Path,
    workdir: Path,
    step: int,
    *options: str,
    whole_group: bool = True,
    launcher: str = "refit.flows.cli stage train",
    counter: str = "step",
) -> None:
    """Run the stage in a subprocess and SIGKILL its process group (or the stage process
    alone) once `step` is logged (as `counter`: optimizer_warmup_step for a step of the
    optimizer warm-up): a machine crash, as far as the workdir can tell. The training
    processes, in sessions of their own, must die with it."""
    process = subprocess.Popen(
        [sys.executable, "-m", *launcher.split(), str(path), "--workdir", str(workdir), *options],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = workdir / "train.tmp" / "metrics.jsonl"  # the run in progress, staged
    deadline = time.time() + 300
    while not (
        log.exists() and any(json.loads(line).get(counter, -1) >= step for line in log.read_text().splitlines())
    ):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.002)
    # the launcher and the ranks, taken before the kill: a dying process's command line can
    # read empty while it still holds the workdir lock
    helpers = [pid for pid in workdir_processes(workdir) if pid != process.pid]
    if whole_group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(signal.SIGKILL)
    process.wait()
    assert wait_exited(helpers) == [], "the launcher or training processes outlived the killed stage"
    assert training_processes(workdir) == []


# ----------------------------------------------------------------------------- scoring
# Multiple-choice items and documents for the scorer, in the tiny tokenizer's words.


def make_items(n: int = 36, seed: int = 0) -> list[dict]:
    """Multiple-choice items in the tiny tokenizer's words; choices of 1 to 6 words, so that
    accuracy by total log-likelihood and by log-likelihood per character disagree."""
    words = sorted(set(TEXT.split()))
    rng = random.Random(seed)
    items = []
    for i in range(n):
        query = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        choices = [" " + " ".join(rng.choices(words, k=k)) for k in rng.sample([1, 2, 4, 6], 4)]
        items.append({"id": f"item-{i}", "query": query, "choices": choices, "gold": i % 4})
    return items


def scoring_tasks() -> list:
    """A benchmark of 24 items and 9 documents of different lengths, as evaluate's scorer takes them."""
    from refit.stages.evaluate.scorer import ScoringTask

    texts = [TEXT[i * 97 : i * 97 + 50 + 40 * i] for i in range(9)]  # 9 documents of different lengths
    return [ScoringTask("bench", "choices", make_items(24)), ScoringTask("docs", "documents", texts, seq_len=16)]


# ----------------------------------------------------------------------------- memory probes

MEMORY_PROBE = """
import os
import sys
from pathlib import Path
import pyarrow as pa
from refit.stages.tokenize import stage as tokenize
from refit.stages.audit.gates import contamination_gate
from refit.stages.core.config import load_recipe
reader, runs = sys.argv[1], sys.argv[2:]
for recipe, workdir in zip(map(load_recipe, runs[::2]), map(Path, runs[1::2])):
    if reader == "tokenize":
        tokenize.use_tokenizer(str(recipe.tokenizer))
        jobs = tokenize.plan_jobs(recipe, workdir, workdir / "tokenize.tmp", "probe")
        tokenize.write_shard(jobs[-1], recipe.tokenize.seq_len, recipe.tokenize.batch_size, {})
    else:
        contamination_gate(recipe, workdir, ["docs"])
    print(pa.default_memory_pool().max_memory())  # the peak so far
"""


def arrow_peaks(reader: str, tmp_path: Path, tokenizer: Path, sizes: tuple[int, ...]) -> list[int]:
    """The peak Arrow memory of a fresh process running reader ("tokenize" or the audit's
    "contamination" gate) over curated files of random 4 KiB documents of each size (MiB) in turn."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    runs = []
    for mebibytes in sizes:
        folder = tmp_path / f"{mebibytes}mib"
        letters = np.random.default_rng(mebibytes).integers(97, 123, size=mebibytes * 2**20, dtype=np.uint8)
        letters[::64] = ord(" ")  # long words: the contamination gate's n-grams stay quick
        text = letters.tobytes().decode()
        starts = range(0, len(text), 4096)
        (folder / "wd" / "curate" / "docs").mkdir(parents=True)
        pq.write_table(
            pa.table({"id": [str(i) for i in starts], "text": [text[i : i + 4096] for i in starts]}),
            folder / "wd" / "curate" / "docs" / "train-0001.parquet",
        )
        write_jsonl(folder / "data" / "d.jsonl", [{"id": "x", "text": "unused"}])
        recipe = make_recipe(
            folder,
            [{"name": "docs", "paths": ["data/d.jsonl"], "role": "new"}],
            sections={"tokenizer": str(tokenizer), "tokenize": {"seq_len": 64, "rows_per_shard": 100}},
        )
        runs += [str(recipe), str(folder / "wd")]
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, reader, *runs], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    return [int(line) for line in probe.stdout.split()]


# ----------------------------------------------------------------------------- Prefect


@pytest.fixture(scope="session")
def prefect_harness():
    """One embedded Prefect server (SQLite) for the whole session: the first start is slow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@contextmanager
def small_filesystem(folder: Path, size: int):
    """A tmpfs of `size` bytes mounted at folder, to fill; the test is skipped where mounting
    is not permitted (it needs root)."""
    folder.mkdir(parents=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command to make a small filesystem")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {result.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        busy = subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0
        if busy:  # a file left open there: detach the mount anyway, then say so
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
    assert not busy, "a file on the small disk was left open"


def rewrite_output(folder: Path, name: str, text: str) -> None:
    """Replace a finished stage's output file as if the stage had written it so (its done
    marker records the new sha256 and size): a hand edit is otherwise a damaged output."""
    from refit.stages.core.markers import MARKER, file_sha256

    (folder / name).write_text(text)
    marker = json.loads((folder / MARKER).read_text())
    marker["outputs"][name] = file_sha256(folder / name)
    marker["sizes"][name] = (folder / name).stat().st_size
    (folder / MARKER).write_text(json.dumps(marker))
