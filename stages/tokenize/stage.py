"""tokenize: curated documents -> fixed-length packed token sequences in Arrow shards.

Writes `<workdir>/tokenize/<source>/shard-NNNNN.arrow` (Arrow IPC file format,
uncompressed, memory-mappable; one FixedSizeList column `tokens` of seq_len ids, uint16
when the vocabulary fits) and `index.json` with rows, tokens and sha256 per shard.

Each shard packs one contiguous run of documents of one curated file (documents joined
by EOS; the last partial row is dropped, under seq_len tokens per shard), so shards are
independent: datatrove tasks write them in parallel (`WriteShards`, on curate.executor:
local processes, Ray or Slurm, tokenize.workers at once), a shard is a pure function of its
input range, and a rerun (after a kill, or after curate added a batch) writes only the
shards that are missing. Curated files are read in record batches of tokenize.batch_size
documents, never whole, so memory does not grow with the size of a curated file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

from refit.stages.core.config import CurateSpec, Recipe, fingerprinted
from refit.stages.core.contract import Stage
from refit.stages.core.executors import Step, run_steps
from refit.stages.core.markers import (
    file_sha256,
    fingerprint,
    is_done,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.core.paths import inside
from refit.stages.core.shards import token_dtype, write_rows
from refit.stages.curate import stage as curate

log = logging.getLogger(__name__)
FOLDER = "tokenize"


@with_config(ConfigDict(extra="forbid"))
class TokenizeReport(TypedDict):
    stage: str
    tokenizer_sha256: str
    seq_len: int
    eos_id: str
    vocab_size: str
    dtype: str  # of the token ids in the shards: uint16 when the vocabulary fits
    sources: dict[str, dict]  # per source: rows, tokens, shards
    seconds: float


CHARS_PER_TOKEN = 4  # only sizes the document runs behind each shard; the rows are exact
_TOKENIZER = None  # per worker process


@dataclass(frozen=True)
class ShardJob:
    source: str
    index: int
    input_file: str
    start: int  # first row of input_file
    stop: int  # one past the last row
    out: str
    settings: str  # hash of tokenizer and packing settings


def tokenizer_dir(recipe: Recipe) -> Path:
    return Path(recipe.tokenizer or recipe.base_model.path)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: Refit needs a fast (Rust) tokenizer, found {type(tokenizer).__name__}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token to separate documents")
    # whole documents are encoded, then packed into rows of tokenize.seq_len by Refit: a document
    # longer than the model's context is expected, and the library's warning about it is noise
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def tokenizer_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    return digest.hexdigest()


def plan_jobs(recipe: Recipe, workdir: Path, out: Path, settings: str) -> list[ShardJob]:
    """Cut every curated train file into runs of documents of about one shard each."""
    budget = recipe.tokenize.rows_per_shard * recipe.tokenize.seq_len * CHARS_PER_TOKEN
    jobs = []
    for source in recipe.sources:
        index = 0
        for path in curate.curated_files(workdir, source.name, "train"):
            rows = pq.ParquetFile(path).metadata.num_rows
            start, chars, row = 0, 0, 0
            for texts in curate.curated_texts(path, recipe.tokenize.batch_size):
                for length in pc.utf8_length(texts).to_numpy():
                    chars, row = chars + int(length), row + 1
                    if chars >= budget or row == rows:
                        jobs.append(
                            ShardJob(
                                source.name,
                                index,
                                str(path),
                                start,
                                row,
                                str(inside(out, source.name, f"shard-{index:05d}.arrow")),
                                settings,
                            )
                        )
                        index, start, chars = index + 1, row, 0
    return jobs


def use_tokenizer(path: str) -> None:
    """Load the tokenizer that `write_shard` uses in this process."""
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(Path(path))


class WriteShards(PipelineStep):
    """Datatrove task r of tokenize: writes shard jobs r, r + tasks, ... (see `write_shard`).
    Runs on curate.executor (local, Ray or Slurm) with tokenize.workers tasks at once."""

    type = "🔢 - TOKENIZER"
    name = "📦 tokenize and pack shards"

    def __init__(self, jobs: list[ShardJob], tokenizer: str, seq_len: int, batch_size: int, metadata: dict) -> None:
        super().__init__()
        self.jobs, self.tokenizer, self.metadata = jobs, tokenizer, metadata
        self.seq_len, self.batch_size = seq_len, batch_size

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
        use_tokenizer(self.tokenizer)
        for job in self.jobs[rank::world_size]:
            write_shard(job, self.seq_len, self.batch_size, self.metadata)
            log.info("tokenize: %s shard %d written", job.source, job.index)
            self.stat_update("shards")
        yield from ()


def write_shard(job: ShardJob, seq_len: int, batch_size: int, metadata: dict[str, str]) -> dict:
    """Tokenize, pack and write one shard atomically; returns its index entry."""
    tokenizer = _TOKENIZER
    eos = tokenizer.eos_token_id
    pieces, docs = [], 0
    for texts in curate.curated_texts(Path(job.input_file), batch_size, job.start, job.stop):  # never the whole file
        for ids in tokenizer(texts.to_pylist(), add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(np.asarray([eos], dtype=np.int64))
        docs += len(texts)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    out = Path(job.out)
    rows = write_rows(out, flat, seq_len, token_dtype(len(tokenizer)), {**metadata, "source": job.source})
    entry = {
        "file": out.name,
        "rows": rows,
        "tokens": rows * seq_len,
        "sha256": file_sha256(out),
        "docs": docs,
        "dropped_tail_tokens": int(len(flat) - rows * seq_len),
        "job": asdict(job),
    }
    write_json_atomic(out.with_suffix(".json"), entry)  # the shard is complete once this exists
    return entry


def _complete(job: ShardJob) -> dict | None:
    sidecar = Path(job.out).with_suffix(".json")
    if not sidecar.is_file() or not Path(job.out).is_file():
        return None
    entry = json.loads(sidecar.read_text())
    return entry if entry["job"] == asdict(job) else None


def other_inputs(recipe: Recipe, workdir: Path) -> dict:
    """What the shards depend on besides the recipe values: the tokenizer, by its files' content."""
    return {"tokenizer": tokenizer_sha256(tokenizer_dir(recipe))}


def _settings(recipe: Recipe, workdir: Path) -> str:
    """What a shard is made with besides its documents: the packing settings, the tokenizer and
    the code; a shard made with other settings is never reused (see `_complete`)."""
    made_with = {"tokenize": fingerprinted(recipe.tokenize), **other_inputs(recipe, workdir)}
    return fingerprint("tokenize-settings", made_with, (), STAGE.code_version)


def run_tokenize(recipe: Recipe, workdir: Path, force: bool = False) -> TokenizeReport:
    """Tokenize every source's curated train documents; returns the report."""
    workdir = Path(workdir)
    final = workdir / FOLDER
    settings, expected = _settings(recipe, workdir), STAGE.input_fingerprint(recipe, workdir)
    if not force and is_done(final, expected):
        return json.loads((final / "report.json").read_text())
    started = time.time()
    # a killed run's staging folder is kept, and the previous output's shards are linked in:
    # complete shards are never written twice (unless forced)
    with staged_output(final, seed_previous=not force, reuse=lambda _: not force) as tmp:
        report = _write_shards(recipe, workdir, tmp, settings, expected, started)
    return report


def _write_shards(recipe: Recipe, workdir: Path, tmp: Path, settings: str, expected: str, started: float) -> dict:
    tok_dir = tokenizer_dir(recipe)
    tokenizer = load_tokenizer(tok_dir)
    seq_len = recipe.tokenize.seq_len
    metadata = {
        "tokenizer_sha256": tokenizer_sha256(tok_dir),
        "seq_len": str(seq_len),
        "eos_id": str(tokenizer.eos_token_id),
        "vocab_size": str(len(tokenizer)),
        "dtype": str(token_dtype(len(tokenizer))),
    }
    jobs = plan_jobs(recipe, workdir, tmp, settings)
    wanted = {Path(job.out) for job in jobs} | {Path(job.out).with_suffix(".json") for job in jobs}
    for stale in set(tmp.rglob("shard-*")) - wanted:  # shards of inputs that no longer exist
        stale.unlink()
    for index in tmp.glob("*/index.json"):  # rewritten below for the recipe's sources only
        index.unlink()
    done = {job: entry for job in jobs if (entry := _complete(job)) is not None}
    todo = [job for job in jobs if job not in done]
    log.info("tokenize: %d shards, %d already complete", len(jobs), len(done))
    if todo:
        tasks = min(recipe.tokenize.workers, len(todo))
        step = WriteShards(todo, str(tok_dir), seq_len, recipe.tokenize.batch_size, metadata)
        where = CurateSpec(  # curate's executor, with tokenize's workers
            executor=recipe.curate.executor,
            ray=recipe.curate.ray,
            slurm=recipe.curate.slurm,
            workers=recipe.tokenize.workers,
        )
        run_steps([Step("tokenize", [step], tasks)], where, tmp / "logs")
        for job in todo:
            done[job] = _complete(job)
        log.info("tokenize: %d shards written", len(todo))
    shutil.rmtree(tmp / "logs", ignore_errors=True)  # datatrove's, also a killed run's: not part of the output
    report = {"stage": "tokenize", **metadata, "seq_len": seq_len, "sources": {}}
    for source in recipe.sources:
        shards = [{k: v for k, v in done[j].items() if k != "job"} for j in jobs if j.source == source.name]
        index = {
            "source": source.name,
            **metadata,
            "rows": sum(s["rows"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        folder = inside(tmp, source.name)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "index.json", index)
        report["sources"][source.name] = {k: index[k] for k in ("rows", "tokens")} | {"shards": len(shards)}
    report["seconds"] = round(time.time() - started, 2)
    write_json_atomic(tmp / "report.json", report)
    shard_sha256 = {str(Path(j.out).relative_to(tmp)): done[j]["sha256"] for j in jobs}
    write_marker(tmp, "tokenize", expected, started, STAGE.code_version, known_sha256=shard_sha256)
    return report


def index_files(workdir: Path) -> list[Path]:
    """Every source's shard index (`<source>/index.json`) of the finished output."""
    return sorted((Path(workdir) / FOLDER).glob("*/index.json"))


def shard_path(source: str, file: str) -> str:
    """Where a shard named in a source's index lives, relative to the workdir."""
    return f"{FOLDER}/{source}/{file}"


STAGE = Stage(
    name="tokenize",
    reads=(curate.STAGE,),
    recipe_reads=(
        *("tokenize", "tokenizer", "base_model.path", "sources.name"),  # base_model.path: the default tokenizer
        *("curate.executor", "curate.ray", "curate.slurm"),  # where its steps run: curate's executor
    ),
    folder=FOLDER,
    report=TokenizeReport,
    run_function=run_tokenize,
    other_inputs=other_inputs,
)
