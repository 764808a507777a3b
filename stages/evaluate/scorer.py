"""Scoring engine of the evaluate stage: log-likelihoods under a causal LM on the recipe's
device, one model at a time, optionally data-parallel over several processes, with the base
model's scores cached across runs.

What is scored is a list of `ScoringTask`s, each of one kind:
  "choices"    multiple-choice items {"query", "choices", ...}: the log-likelihood of every
               choice's tokens after the query (as lm-evaluation-harness computes it);
  "documents"  texts: summed NLL (nats) and predicted tokens per text, in windows of seq_len.
A task's scores are raw numbers (`Scores`: named float arrays); metrics are computed from them
by the evaluate stage, so changing a metric neither rescores a model nor invalidates the cache.

Device: `evaluate.device` auto picks CUDA when present; bf16 on GPUs that support it, fp32 on
the CPU (`evaluate.precision` overrides). Requests are batched longest first and returned in
their original order. `score_models` loads one model at a time and frees it before the next.

Data-parallel: with `evaluate.num_processes` N > 1, `torchrun --standalone` starts N workers
(this module's `main`), one GPU each or CPU processes over gloo. Every worker builds the same
rows, takes every N-th of them (longest first, so loads balance), and the per-request results
are gathered in their original order; rank 0 writes them for the parent. Unset, N is what the
training ran on one machine (train.num_processes over its machines), on its GPUs
(train.devices): the processes and devices that trained the model score it.

Cache: `ScoreCache` keeps one model's scores per task under the sha256 of its weights and
tokenizer files (each file hashed once, see file_hashes.py), the task's content (a benchmark's
items, the validation texts), `scorer_version()` (this file, torch, transformers) and the
settings that change the numbers (device, dtype, batch size). The evaluate stage caches the
base model's scores, so sweep variants and nightly runs do not score the base again.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from refit.stages.core import lifeline
from refit.stages.core.file_hashes import directory_sha256
from refit.stages.core.lock import held_locks, record_lock_holder
from refit.stages.core.markers import replaced_atomically
from refit.stages.core.progress import Progress

log = logging.getLogger(__name__)
Scores = dict[str, np.ndarray]
KINDS = ("choices", "documents")


def context_length(config) -> int:
    """Longest input the model takes (longer requests lose tokens on the left)."""
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 1024))


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    """Where and how models are scored (resolved: no "auto" left)."""

    device: str  # "cpu" or "cuda"
    dtype: str  # a torch dtype name: "float32" or "bfloat16"
    batch_size: int
    num_processes: int = 1
    trust_remote_code: bool = False
    prefix_eos: bool = False  # an EOS before each benchmark query (evaluate.prefix_eos)
    devices: tuple[int, ...] | None = None  # GPU ids to score on (train.devices); default: the first ones

    @classmethod
    def resolve(cls, evaluate, trust_remote_code: bool = False, train=None, machines: int = 1) -> ScoringSettings:
        """From the recipe's evaluate section and, for what it leaves unset, its train section
        (trained over `machines` machines): scoring runs in as many processes as training ran on
        one machine, on the same GPUs (train.devices). A device that is not there is an error
        naming the field."""
        import torch

        device = evaluate.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        devices = tuple(train.devices) if train is not None and train.devices and device == "cuda" else None
        processes = evaluate.num_processes
        if processes is None:
            processes = train.num_processes // machines if train is not None else 1
        if device == "cuda":
            visible = len(devices) if devices else torch.cuda.device_count()
            if not visible:
                raise ValueError("evaluate.device is cuda, but this process sees no CUDA device")
            if evaluate.num_processes is None:
                processes = min(processes, visible)  # as training, where this machine has the GPUs for it
            elif processes > visible:
                raise ValueError(
                    f"evaluate.num_processes is {processes}, but only {visible} CUDA device(s) are visible"
                )
        precision = evaluate.precision
        if precision == "auto":
            precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        dtype = {"bf16": "bfloat16", "fp32": "float32"}[precision]
        return cls(device, dtype, evaluate.batch_size, processes, trust_remote_code, evaluate.prefix_eos, devices)

    def numerics(self) -> dict:
        """The settings that change the scores (not how many processes share the work)."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "prefix_eos": self.prefix_eos,
        }


@dataclasses.dataclass(frozen=True)
class ScoringTask:
    """One set of things to score under every model; `key` names it in the results."""

    key: str
    kind: str  # one of KINDS
    inputs: list  # "choices": items with "query" and "choices"; "documents": texts
    seq_len: int | None = None  # "documents": predicted tokens per window

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"scoring task {self.key}: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind == "documents" and not self.seq_len:
            raise ValueError(f"scoring task {self.key}: documents need a seq_len")

    def digest(self) -> str:
        """sha256 of what is scored (for a benchmark: its file's items, as read)."""
        payload = json.dumps([self.kind, self.seq_len, self.inputs], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()


def choice_loglikelihoods(scores: Scores) -> list[np.ndarray]:
    """A "choices" task's scores as one array of choice log-likelihoods per item."""
    ends = np.cumsum(scores["choice_counts"])
    return [scores["loglikelihoods"][end - count : end] for count, end in zip(scores["choice_counts"], ends)]


def free_memory(device: str) -> None:
    """Return a released model's memory, on the GPU too, before the next model is loaded."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class Scorer:
    """Batched log-likelihoods under one causal LM (eval mode, no gradients) on one device.
    Under torch.distributed, each process scores its share of the rows and all get every result."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer_dir: Path,
        batch_size: int,
        trust_remote_code: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        prefix_eos: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per model otherwise
        self.torch = torch
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        placement = {"device_map": str(self.device)} if self.device.type == "cuda" else {}  # load straight onto it
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            use_safetensors=True,
            use_kernels=False,  # the model as trained: no Hub kernel swapped in (transformers >= 5.25's default)
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            **placement,
        ).eval()
        self.batch_size = batch_size
        self.prefix_eos = prefix_eos
        self.max_len = context_length(self.model.config)
        self.slices_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world = torch.distributed.get_world_size() if distributed else 1

    def release(self) -> None:
        """Free the model's memory (host and device) before the next model is loaded."""
        del self.model
        free_memory(self.device.type)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def continuation_logprobs(self, requests: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation given its context, in request order.

        A causal LM's logits at a position depend only on the tokens up to it, so a request
        whose model input (context + continuation less its last token, cut to the model's
        length) is a prefix of another's is read from that one's row: the choices of a
        multiple-choice item that share their first tokens cost one row. Rows are batched
        longest first, padded on the right without an attention mask (causal attention never
        looks right), and the vocabulary projection runs only from the first position read;
        the softmax only at the positions read, in fp32."""
        torch = self.torch
        inputs = [tuple((context + continuation)[-(self.max_len + 1) :][:-1]) for context, continuation in requests]
        rows: list[tuple[int, ...]] = []
        row_of = [0] * len(requests)
        by_tokens = sorted(range(len(requests)), key=inputs.__getitem__)
        for k in reversed(range(len(by_tokens))):  # a prefix sorts just before the inputs that extend it
            i, following = by_tokens[k], by_tokens[k + 1] if k + 1 < len(by_tokens) else None
            if following is not None and inputs[following][: len(inputs[i])] == inputs[i]:
                row_of[i] = row_of[following]
            else:
                row_of[i] = len(rows)
                rows.append(inputs[i])
        readers: list[list[int]] = [[] for _ in rows]
        for i, row in enumerate(row_of):
            readers[row].append(i)
        results: dict[int, np.ndarray] = {}
        longest_first = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
        mine = longest_first[self.rank :: self.world]  # every world-th row: similar lengths on every process
        for first in range(0, len(mine), self.batch_size):
            batch = mine[first : first + self.batch_size]
            width = max(len(rows[r]) for r in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            batch_rows, positions, targets, spans = [], [], [], []
            for b, r in enumerate(batch):
                ids[b, : len(rows[r])] = torch.tensor(rows[r])
                for i in readers[r]:
                    continuation = requests[i][1]
                    end = len(inputs[i])
                    spans.append((i, len(positions), len(continuation)))
                    batch_rows += [b] * len(continuation)
                    positions += range(end - len(continuation), end)
                    targets += continuation
            keep_from = min(positions, default=width - 1)
            kwargs = {"logits_to_keep": width - keep_from} if self.slices_logits else {}
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), use_cache=False, **kwargs).logits
                logits = logits[:, logits.shape[1] - (width - keep_from) :]  # positions keep_from.. (all if not sliced)
                index = torch.tensor([batch_rows, [p - keep_from for p in positions]], device=self.device)
                read = logits[index[0], index[1]].float()  # only the positions read, upcast: the softmax in fp32
                target = torch.tensor(targets, device=self.device).unsqueeze(1)
                logprobs = read.gather(1, target).squeeze(1) - torch.logsumexp(read, dim=-1)
            values = logprobs.cpu().numpy().astype(np.float64)
            for i, start, length in spans:
                results[i] = values[start : start + length]
        if self.world > 1:  # every process gets every result
            shares: list[dict[int, np.ndarray] | None] = [None] * self.world
            torch.distributed.all_gather_object(shares, results)
            results = {i: values for share in shares for i, values in share.items()}
        return [results[i] for i in range(len(requests))]

    def choice_loglikelihoods(self, items: list[dict]) -> list[np.ndarray]:
        """Per item, the log-likelihood of each choice's tokens given the query, encoded as
        lm-evaluation-harness encodes it by default: with the tokenizer's own special tokens (a
        BOS for tokenizers that add one), and an EOS first with prefix_eos."""
        texts = [item["query"] for item in items] + [item["query"] + c for item in items for c in item["choices"]]
        encoded = iter(self.tokenizer(texts)["input_ids"]) if texts else iter(())
        prefix = [self.tokenizer.eos_token_id] if self.prefix_eos else []
        contexts = [next(encoded) for _ in items]
        requests = []
        for item, context in zip(items, contexts):
            for _ in item["choices"]:
                whole = next(encoded)
                requests.append((prefix + context, whole[len(context) :] or whole[-1:]))
        sums = iter([values.sum() for values in self.continuation_logprobs(requests)])
        return [np.array([next(sums) for _ in item["choices"]]) for item in items]

    def document_losses(self, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per document: summed NLL (nats), predicted tokens, UTF-8 bytes. Documents longer than
        seq_len are scored in consecutive windows, each predicted from its own start."""
        eos = self.tokenizer.eos_token_id
        requests, owners = [], []
        for n, text in enumerate(texts):
            ids = [eos] + self.encode(text)  # EOS first: the first token is predicted as a document start
            for start in range(0, len(ids) - 1, seq_len):
                window = ids[start : start + seq_len + 1]
                requests.append((window[:1], window[1:]))
                owners.append(n)
        logprobs = self.continuation_logprobs(requests)
        nll, tokens = np.zeros(len(texts)), np.zeros(len(texts))
        for owner, values in zip(owners, logprobs):
            nll[owner] -= values.sum()
            tokens[owner] += len(values)
        return nll, tokens, np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)

    def score(self, task: ScoringTask) -> Scores:
        if task.kind == "choices":
            lls = self.choice_loglikelihoods(task.inputs)
            return {
                "loglikelihoods": np.concatenate(lls) if lls else np.zeros(0),
                "choice_counts": np.array([len(x) for x in lls], dtype=np.int64),
            }
        nll, tokens, _ = self.document_losses(task.inputs, task.seq_len)
        return {"nll": nll, "tokens": tokens}


def _score_one_model(
    model_dir: Path,
    tokenizer_dir: Path,
    tasks: list[ScoringTask],
    settings: ScoringSettings,
    device: str,
    progress: Progress | None = None,
) -> dict[str, Scores]:
    scorer = Scorer(
        model_dir,
        tokenizer_dir,
        settings.batch_size,
        settings.trust_remote_code,
        device,
        settings.dtype,
        settings.prefix_eos,
    )
    try:
        scores = {}
        for task in tasks:
            scores[task.key] = scorer.score(task)
            if progress is not None:
                progress.advance(f"{task.key} ({model_dir.name})")
        return scores
    finally:
        scorer.release()


def _progress(jobs: dict[str, tuple[Path, list]], logger: logging.Logger) -> Progress:
    """One progress line per task scored, over every model's tasks."""
    progress = Progress("evaluate", sum(len(pending) for _, pending in jobs.values()), "sets scored", logger, every=0)
    progress.update(0)
    return progress


def scorer_version() -> str:
    """What computes the numbers: this file and the libraries under it."""
    import torch
    import transformers

    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"{source}-torch{torch.__version__}-transformers{transformers.__version__}"


class ScoreCache:
    """One model's scores per task, kept in folder across runs (see the module's doc for the key)."""

    def __init__(self, folder: Path, model_dirs: list[Path], settings: ScoringSettings):
        self.folder = Path(folder)
        self.model_sha256 = directory_sha256(model_dirs, self.folder / "file-sha256")
        self.identity = {"model": self.model_sha256, "scorer": scorer_version(), "settings": settings.numerics()}

    def path(self, task: ScoringTask) -> Path:
        key = json.dumps({**self.identity, "task": task.digest()}, sort_keys=True)
        return self.folder / "scores" / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"

    def get(self, task: ScoringTask) -> Scores | None:
        path = self.path(task)
        try:
            with np.load(path, allow_pickle=False) as stored:
                scores = {name: stored[name] for name in stored.files}
            os.utime(path)  # in use: `prune` keeps it
            return scores
        except FileNotFoundError:
            return None
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # unreadable: score again, and replace it
            log.warning("evaluate: ignoring unreadable cached scores %s: %s", path, error)
            return None

    def put(self, task: ScoringTask, scores: Scores) -> None:
        path = self.path(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path, "wb", f".{os.getpid()}.tmp") as handle:  # other runs may write it too
            np.savez(handle, **scores)

    def prune(self, max_age_days: float) -> int:
        """Remove every model's scores neither read nor written for max_age_days, so the folder
        does not grow night after night with the scores of bases no later run uses again; the
        number removed."""
        cutoff, removed = time.time() - max_age_days * 86400, 0
        for path in (self.folder / "scores").glob("*.npz"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # pruned by a concurrent run
                pass
        return removed


def score_models(
    models: dict[str, Path],
    tokenizer_dir: Path,
    tasks: list[ScoringTask],
    settings: ScoringSettings,
    caches: dict[str, ScoreCache] | None = None,
) -> tuple[dict[str, dict[str, Scores]], dict[str, dict]]:
    """Every task under every model, loading one model at a time (in the order given).
    A model with a cache is scored only on the tasks missing from it, and not loaded at all
    when none is. Returns the scores (model -> task key -> Scores) and, per model, how many
    tasks were scored and how many came from its cache."""
    caches = caches or {}
    scores: dict[str, dict[str, Scores]] = {name: {} for name in models}
    to_score: dict[str, list[ScoringTask]] = {}
    for name in models:
        cache = caches.get(name)
        for task in tasks:
            hit = cache.get(task) if cache else None
            if hit is not None:
                scores[name][task.key] = hit
        to_score[name] = [task for task in tasks if task.key not in scores[name]]
    jobs = {name: (models[name], pending) for name, pending in to_score.items() if pending}
    if settings.num_processes == 1:
        progress = _progress(jobs, log)
        device = f"cuda:{settings.devices[0]}" if settings.devices else settings.device
        fresh = {
            name: _score_one_model(path, tokenizer_dir, pending, settings, device, progress)
            for name, (path, pending) in jobs.items()
        }
    else:
        fresh = _score_in_workers(jobs, tokenizer_dir, settings)
    summary = {}
    for name, pending in to_score.items():
        for task in pending:
            scores[name][task.key] = fresh[name][task.key]
            if name in caches:
                caches[name].put(task, fresh[name][task.key])
        summary[name] = {"tasks_scored": len(pending), "tasks_cached": len(tasks) - len(pending)}
    return scores, summary


def launch_command(num_processes: int, job_dir: Path) -> list[str]:
    """torchrun on this machine, one worker per process; it picks a free rendezvous port. It dies
    with this process, and the workers with it (lifeline.py)."""
    return lifeline.command(
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(num_processes),
        "-m",
        "refit.stages.evaluate.scorer",
        str(job_dir),
    )


def _score_in_workers(
    jobs: dict[str, tuple[Path, list[ScoringTask]]], tokenizer_dir: Path, settings: ScoringSettings
) -> dict[str, dict[str, Scores]]:
    """Run the jobs in settings.num_processes torchrun workers; each model's scores come back
    as `<model>.npz` (arrays named `<task index>.<name>`)."""
    if not jobs:
        return {}
    tasks = list({task.key: task for _, pending in jobs.values() for task in pending}.values())  # each once
    index = {task.key: i for i, task in enumerate(tasks)}
    with tempfile.TemporaryDirectory(prefix="refit-scoring-") as scratch:
        job_dir = Path(scratch)
        job = {
            "settings": dataclasses.asdict(settings),
            "tokenizer": str(tokenizer_dir),
            "tasks": [dataclasses.asdict(task) for task in tasks],
            "models": [
                {"name": name, "path": str(path), "tasks": [index[task.key] for task in pending]}
                for name, (path, pending) in jobs.items()
            ],
        }
        (job_dir / "job.json").write_text(json.dumps(job))
        threads = max(1, (os.cpu_count() or 1) // settings.num_processes)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if settings.devices:  # worker r scores on the r-th of them (LOCAL_RANK), as training places its processes
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, settings.devices))
        command = launch_command(settings.num_processes, job_dir)
        log.info("evaluate: %s", " ".join(command))
        # its own session, so that an interrupted stage stops every worker; it holds the workdir lock too
        process = subprocess.Popen(command, env=env, start_new_session=True, pass_fds=held_locks())
        record_lock_holder(process.pid)
        try:
            code = process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        if code != 0:
            raise RuntimeError(f"scoring processes failed (exit code {code}); see their log above")
        results = {}
        for model in job["models"]:
            with np.load(job_dir / f"{model['name']}.npz", allow_pickle=False) as stored:
                results[model["name"]] = {
                    tasks[i].key: {
                        name.split(".", 1)[1]: stored[name] for name in stored.files if name.split(".")[0] == str(i)
                    }
                    for i in model["tasks"]
                }
        return results


def main(job_dir: Path) -> None:
    """One torchrun worker: score each model of the job on this rank's share; rank 0 writes."""
    import torch
    import torch.distributed as dist

    job = json.loads((job_dir / "job.json").read_text())
    settings = ScoringSettings(**job["settings"])
    tasks = [ScoringTask(**task) for task in job["tasks"]]
    device = "cpu"
    if settings.device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("gloo")  # only results are exchanged, as Python objects: gloo on GPUs too
    progress = None
    if dist.get_rank() == 0:  # rank 0's progress stands for all: each rank scores its share of every task
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        progress = _progress({m["name"]: (Path(m["path"]), m["tasks"]) for m in job["models"]}, log)
    try:
        for model in job["models"]:
            chosen = [tasks[i] for i in model["tasks"]]
            scores = _score_one_model(Path(model["path"]), Path(job["tokenizer"]), chosen, settings, device, progress)
            if dist.get_rank() == 0:
                arrays = {f"{i}.{name}": v for i, t in zip(model["tasks"], chosen) for name, v in scores[t.key].items()}
                with open(job_dir / f"{model['name']}.npz", "wb") as handle:
                    np.savez(handle, **arrays)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    lifeline.die_with_launcher()  # no scoring process outlives its launcher (lifeline.py)
    main(Path(sys.argv[1]))
