"""How the training processes share the model: one class per `train.strategy`, chosen once
from the recipe by `strategy_for`, holding all that differs between them. The rest of
training (data order, DCP checkpoints, the export) is the same for both, which is why a run
can resume under the other strategy.

DDP: every process holds the whole model; accelerate wraps it in DistributedDataParallel
and autocasts. FSDP: FSDP2's `fully_shard` on each decoder layer and on the root, casting
through its mixed-precision policy.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from accelerate import Accelerator

from refit.stages.core.config import Recipe


def _precision(recipe: Recipe) -> str:
    """accelerate's name for what train.precision comes to on this machine: "bf16" or "no"."""
    if recipe.train.precision == "fp32" or not torch.cuda.is_available():
        return "no"
    if recipe.train.precision == "bf16" or torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class Strategy(ABC):
    """What differs between the ways of sharing the model over the processes."""

    shards_layers: bool
    """Whether `wrap` needs the model's decoder layers."""

    @abstractmethod
    def autocast(self, recipe: Recipe) -> str:
        """accelerate's mixed_precision setting."""

    @abstractmethod
    def wrap(
        self, model: torch.nn.Module, layers: list[torch.nn.Module], recipe: Recipe, device: torch.device
    ) -> torch.nn.Module:
        """The model on its device, sharded or not, before the optimizer is built."""

    @abstractmethod
    def prepare(
        self, acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """What the training steps run (checkpoints and the export read the unwrapped pair)."""

    @abstractmethod
    def micro_batch(self, acc: Accelerator, model: torch.nn.Module, reduce: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward pass; only the one with
        reduce (the last of the step) reduces the gradients across processes."""

    @abstractmethod
    def clip_gradients(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip the gradients to max_norm; their norm before clipping, over the whole model."""

    @abstractmethod
    def load_optimizer_file(self, optimizer: torch.optim.Optimizer, path: str) -> None:
        """train.optimizer_state given as a `torch.save(optimizer.state_dict())` file."""

    @abstractmethod
    def out_of_memory_hint(self, recipe: Recipe) -> str:
        """What else to change when a step runs out of GPU memory."""


class DDP(Strategy):
    shards_layers = False

    def autocast(self, recipe):
        return _precision(recipe)

    def wrap(self, model, layers, recipe, device):
        return model.to(device)  # fused AdamW steps on the device

    def prepare(self, acc, model, optimizer):
        return acc.prepare(model, optimizer)

    def micro_batch(self, acc, model, reduce):
        return contextlib.nullcontext() if reduce else acc.no_sync(model)

    def clip_gradients(self, model, max_norm):
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def load_optimizer_file(self, optimizer, path):
        optimizer.load_state_dict(torch.load(path, weights_only=True))

    def out_of_memory_hint(self, recipe):
        return "set train.strategy: fsdp to shard the model and optimizer over the processes"


class FSDP(Strategy):
    shards_layers = True

    def autocast(self, recipe):
        return "no"  # the mixed-precision policy casts instead

    def wrap(self, model, layers, recipe, device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():  # one process: accelerate starts no group, FSDP2 needs one
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy()
        if _precision(recipe) == "bf16":
            # bf16 parameters and compute, fp32 gradient reduction; the sharded fp32 master weights stay
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in layers:  # fully_shard also moves the shards to the mesh's device
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def prepare(self, acc, model, optimizer):
        return model, optimizer  # already sharded: accelerate's wrapping is DDP's

    def micro_batch(self, acc, model, reduce):
        model.set_requires_gradient_sync(reduce)
        return contextlib.nullcontext()

    def clip_gradients(self, model, max_norm):
        # the norm comes as a DTensor: full_tensor() makes it the norm over every shard
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).full_tensor())

    def load_optimizer_file(self, optimizer, path):
        raise ValueError(
            f"train.optimizer_state: {path} is a torch.save file, which only strategy ddp loads; "
            f"give a Refit checkpoint folder (train/checkpoints/step-NNNNNNNN/) instead"
        )

    def out_of_memory_hint(self, recipe):
        return f"shard over more processes (train.num_processes, now {recipe.train.num_processes})"


STRATEGIES: dict[str, Strategy] = {"ddp": DDP(), "fsdp": FSDP()}


def strategy_for(recipe: Recipe) -> Strategy:
    return STRATEGIES[recipe.train.strategy]
