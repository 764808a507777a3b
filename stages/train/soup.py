"""Model soups (#26): the weights of anneal ingredients, copies of the last phase trained from
one checkpoint in orders of their own (sampler.py), averaged uniformly or greedily.

The average streams: one tensor of one input is read at a time (safe_open from a Hugging Face
folder, or loaded from a training checkpoint's DCP shards, fsdp's included, by this process
alone) and added into a float64 sum in input order, then the mean is cast back to the inputs'
dtype. So the bytes are the same on every run, and memory holds a tensor's sum and one shard
of the output besides. The output is written in `<out_dir>.tmp/` and swapped in when
complete: a run killed midway leaves the previous soup (or none), and a rerun starts over.

Inputs are Hugging Face model folders (safetensors) or checkpoint folders (`.metadata`, the
model under `model.`). A checkpoint also holds tied copies that the export leaves out, so the
tensors of a soup are named by its first input: the tensors of a Hugging Face folder, or
those that `export_weights` writes for the architecture of `like`'s config.json. `like` (by
default the first input, which must then be a Hugging Face folder) also gives the soup its
other files: config, generation config, tokenizer.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from refit.stages.core.markers import MARKER, swap_into_place
from refit.stages.core.shards import read_shard
from refit.stages.train.loop import EXPORT_SHARD_BYTES, SafetensorsShards, skipped_on_export, validation_loss

Spec = tuple[tuple[int, ...], torch.dtype]  # shape, dtype

WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", MARKER)


class SafetensorsWeights:
    """A Hugging Face folder's tensors: model.safetensors or the shards its index names."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        files = ["model.safetensors"]
        if index.is_file():
            files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        elif not (folder / "model.safetensors").is_file():
            raise ValueError(f"{folder} holds neither model.safetensors (or its index) nor a checkpoint's .metadata")
        self.file_of: dict[str, str] = {}
        self.specs: dict[str, Spec] = {}
        for file in files:
            with safe_open(folder / file, framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    shape = tuple(piece.get_shape())
                    empty = piece[:0] if shape else handle.get_tensor(name)  # the dtype in torch's terms
                    self.specs[name], self.file_of[name] = (shape, empty.dtype), file

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.folder / self.file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)


class CheckpointWeights:
    """A training checkpoint's weights (`model.<name>` in DCP shards), each tensor loaded whole
    by this process without a process group (no_dist), whatever number of processes wrote it."""

    def __init__(self, folder: Path, names: list[str]):
        from torch.distributed.checkpoint import FileSystemReader

        self.folder = folder
        stored = FileSystemReader(folder).read_metadata().state_dict_metadata
        self.specs: dict[str, Spec] = {}
        for name in names:
            if f"model.{name}" not in stored:
                raise ValueError(f"tensor {name}: the checkpoint {folder} holds no model.{name}")
            meta = stored[f"model.{name}"]
            self.specs[name] = (tuple(meta.size), meta.properties.dtype)

    def read(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        shape, dtype = self.specs[name]
        state = {"model": {name: torch.empty(shape, dtype=dtype)}}
        with warnings.catch_warnings():  # the warning that no process group is in use: none is meant to be
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=self.folder, no_dist=True)
        return state["model"][name]


def is_checkpoint(folder: Path) -> bool:
    return (folder / ".metadata").is_file()


def exported_names(like: Path) -> list[str]:
    """The tensors `export_weights` writes for the architecture of like's config.json, in its
    order: the model is built on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    skipped = skipped_on_export(model)
    return [name for name in model.state_dict() if name not in skipped]


def open_inputs(models: list[Path], like: Path) -> list[SafetensorsWeights | CheckpointWeights]:
    """Each input's tensors, refused unless all hold the first's names, shapes and dtypes."""
    first = models[0]
    inputs = [SafetensorsWeights(first) if not is_checkpoint(first) else CheckpointWeights(first, exported_names(like))]
    names = list(inputs[0].specs)
    for folder in models[1:]:
        inputs.append(CheckpointWeights(folder, names) if is_checkpoint(folder) else SafetensorsWeights(folder))
        specs = inputs[-1].specs
        for name in sorted(set(names) ^ set(specs)):
            holder, other = (folder, first) if name in specs else (first, folder)
            raise ValueError(f"tensor {name}: {holder} holds it, {other} does not (another architecture?)")
        for name in names:
            if specs[name] != inputs[0].specs[name]:
                raise ValueError(
                    f"tensor {name}: {folder} has shape {list(specs[name][0])} {specs[name][1]}, "
                    f"{first} has {list(inputs[0].specs[name][0])} {inputs[0].specs[name][1]}"
                )
    return inputs


def average_weights(
    models: list[Path],
    out_dir: Path,
    weights: list[float] | None = None,
    like: Path | None = None,
    shard_bytes: int = EXPORT_SHARD_BYTES,
) -> dict[str, str]:
    """The weighted average (uniform by default) of the models' weights into out_dir, a Hugging
    Face folder with like's other files; {weight file name: sha256}."""
    models, out_dir = [Path(m) for m in models], Path(out_dir)
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if not models or len(weights) != len(models) or min(weights) < 0 or not sum(weights):
        raise ValueError(f"{len(models)} models and weights {weights}: give one non-negative weight per model")
    like = Path(like or models[0])
    if not (like / "config.json").is_file():
        raise ValueError(f"{like} has no config.json: give like=, a Hugging Face folder of the architecture")
    inputs = open_inputs(models, like)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's remains
    tmp.mkdir(parents=True)
    shards = SafetensorsShards(tmp, shard_bytes)
    for name, (shape, dtype) in inputs[0].specs.items():
        total = torch.zeros(shape, dtype=torch.float64)
        for source, weight in zip(inputs, weights):
            total.add_(source.read(name), alpha=weight)
        shards.add(name, (total / sum(weights)).to(dtype))
    digests = shards.close()
    weight_files = {path for pattern in WEIGHT_FILES for path in like.glob(pattern)}
    for path in sorted(like.iterdir()):
        if path.is_file() and path not in weight_files:
            shutil.copy2(path, tmp / path.name)
    swap_into_place(tmp, out_dir)
    return digests


@dataclass
class GreedySoup:
    kept: list[Path]  # the ingredients in the soup
    losses: list[float]  # per ingredient tried: the loss of the soup with it (the first: alone)
    digests: dict[str, str]  # the soup's weight files


def greedy_soup(
    ingredients: list[Path],
    out_dir: Path,
    loss_of: Callable[[Path], float],
    like: Path | None = None,
    shard_bytes: int = EXPORT_SHARD_BYTES,
) -> GreedySoup:
    """Greedy soup (Wortsman et al., 2022): the ingredients come best first by held-out loss;
    the soup starts as the first, and each next one joins it (a uniform average) only if the
    soup's loss drops. loss_of scores a Hugging Face folder: each candidate is written (in
    `<out_dir>.candidate/`) before it is scored, so the soup kept is the very bytes scored. The
    soup goes into out_dir at the end; a rerun after a kill tries every ingredient again."""
    out_dir = Path(out_dir)
    candidate, best = (out_dir.with_name(out_dir.name + suffix) for suffix in (".candidate", ".best"))
    kept: list[Path] = []
    losses: list[float] = []
    digests: dict[str, str] = {}
    kept_loss = math.inf
    for ingredient in ingredients:
        tried = average_weights([*kept, ingredient], candidate, like=like, shard_bytes=shard_bytes)
        losses.append(loss_of(candidate))
        if not kept or losses[-1] < kept_loss:
            kept.append(Path(ingredient))
            kept_loss, digests = losses[-1], tried
            swap_into_place(candidate, best)
    swap_into_place(best, out_dir)
    shutil.rmtree(candidate, ignore_errors=True)
    return GreedySoup(kept, losses, digests)


def validation_loss_of(
    rows: Path, batch_size: int, device: str = "cpu", trust_remote_code: bool = False
) -> Callable[[Path], float]:
    """A greedy soup's loss_of: the mean token loss of the held-out rows in `rows` (the train
    stage's validation.arrow) under a Hugging Face folder's weights in fp32, computed in this
    process as the training processes compute it at their checkpoints (loop.validation_loss)."""
    from transformers import AutoModelForCausalLM

    held_out = torch.from_numpy(read_shard(rows).astype("int64"))

    def loss_of(folder: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(
            folder, use_safetensors=True, use_kernels=False, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        return validation_loss(model.to(device), held_out, batch_size, torch.device(device))

    return loss_of
