"""The capacity plan: the memory each training device needs, and the time and cost of the run,
from the base model's config alone (the model is built on the meta device: no weight is read)
and the recipe's train section. `refit plan` prints it; `refit validate` refuses a recipe whose
setup does not fit its devices, naming the smallest change that would.

Memory per device, as stages/train trains (P parameters, N processes, P_layer those of one
decoder layer, P_root the rest: embeddings, final norm, LM head; c bytes per element of the
compute dtype, 2 for bf16 and 4 for fp32):

- parameters: fp32 master weights. ddp: 4P, every process holds the model. fsdp: 4P/N of
  shards, plus the gathered compute-dtype copies of the root (FSDP2 keeps it gathered from
  the forward through the backward pass) and of two layers (the one running, the one
  prefetched): c (P_root + 2 P_layer).
- gradients: fp32. ddp: 4P, and as much again in DDP's communication buckets when N > 1.
  fsdp: 4P/N of shards plus one layer's unsharded gradient (c P_layer, and its fp32 copy for
  the reduce-scatter under bf16); but with more than one micro-batch per step the ones before
  the last accumulate unsharded fp32 gradients without reducing them
  (`set_requires_gradient_sync(False)`): 4P.
- optimizer: AdamW's two fp32 moments, 8P (8P/N under fsdp).
- activations of one micro-batch of b sequences of s tokens (tokenize.seq_len), counted per
  token for what autograd keeps of a Llama-style decoder layer (hidden width h, attention width
  A = heads x head_dim, key/value width KV, intermediate width i):
    each RMSNorm: its fp32 input and inverse RMS (4h + 4), the normalised values in the
      residual stream's dtype, and its output as the matmuls after it keep it: c h, once per
      matmul under ddp's bf16 autocast, which casts the fp32 output for each separately;
    attention: q, k, v and the output, c (2A + 2KV), and the log-sum-exp per head in fp32
      (SDPA's flash kernels keep no s x s matrix);
    gated MLP: gate, up, their activation and product, 4 c i (2 c i for a plain MLP);
    the loss: the fp32 log-softmax over the vocabulary V and, at the start of the backward
      pass, the two fp32 gradients of the logits: 12V, after the final norm.
  The residual stream is fp32 but under fsdp with bf16, whose mixed-precision policy casts
  the weights and so the embeddings. With activation checkpointing each layer keeps only its
  input, and one layer's activations are recomputed at a time in the backward pass.

At the start of the backward pass of the step's last micro-batch all the activations are held,
with the gradients of the micro-batches before it: the peak, with more than one micro-batch
per step. With one, there are no gradients yet, and they grow as the backward pass frees the
activations: the peak holds the larger of the two (and DDP's buckets throughout). A setup fits
when it needs at most USABLE of the device's memory: the CUDA context, NCCL's buffers and the
allocator's fragmentation take the rest. Measured against torch's own count on the CPU by
tests/core/test_capacity.py.

Throughput: a token costs 6 FLOPs per parameter that multiplies it (all but the input
embedding's; a tied LM head counts) and 12 x layers x A x s for attention, as PaLM counts the
model FLOPs of MFU; a device delivers cost.assumed_mfu of cost.device_peak_flops of them.
Activation checkpointing computes the forward pass twice: 8 FLOPs per parameter instead of 6
at the same utilisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from refit.stages.core.schedule import tokens_per_step

if TYPE_CHECKING:
    from refit.stages.core.config import Recipe

GiB = 2**30
USABLE = 0.9
"""Share of a device's memory a setup may plan for."""
CPU_CORE_PEAK_FLOPS = {"AVX512": 2e11, "AVX2": 1e11}
"""Peak fp32 FLOP/s assumed of one CPU core by the vector units torch uses on it: two FMA units
of 16 fp32 lanes (AVX-512) or 8 (AVX2, and what else) at about 3 GHz. On the CPU the cores are
shared between the processes; cost.device_peak_flops overrides it."""


def cpu_core_peak_flops() -> tuple[float, str]:
    """The assumed peak of one core here, and the capability it is assumed for."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    known = capability if capability in CPU_CORE_PEAK_FLOPS else "AVX2"
    return CPU_CORE_PEAK_FLOPS[known], capability


GPU_PEAK_FLOPS = {
    "H100 PCIe": (756e12, 51e12),
    "H100 NVL": (835e12, 60e12),
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 30.3e12),
}
"""Dense bf16 (tensor core) and fp32 peak FLOP/s from the data sheets, by a part of the name
torch gives the GPU; the first match counts. Training leaves TF32 off, so fp32 is the plain one."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model."""

    parameters: int
    layer_parameters: int
    """Of one decoder layer."""
    layers: int
    hidden: int
    heads: int
    attention_width: int
    """heads x head_dim: the width of q and of the attention output."""
    kv_width: int
    """Key/value heads x head_dim."""
    intermediate: int
    mlp_matrices: int
    """3 for a gated MLP (gate, up, down), 2 for a plain one."""
    vocab: int
    matmul_parameters: int
    """The parameters that multiply each token: all but the input embedding's (a tied LM head counts)."""

    @property
    def root_parameters(self) -> int:
        return self.parameters - self.layers * self.layer_parameters


def model_shape(config: Any, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the causal LM a transformers config describes, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers = config.num_hidden_layers
    stack = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers), None)
    if stack is None:
        raise ValueError(f"{type(model).__name__} holds no list of its {layers} decoder layers")
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layer_parameters = sum(p.numel() for p in stack[0].parameters())
    attention = hidden * (2 * heads * head_dim + 2 * kv_width)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    parameters = sum(p.numel() for p in model.parameters())  # a tied LM head once
    return ModelShape(
        parameters=parameters,
        layer_parameters=layer_parameters,
        layers=layers,
        hidden=hidden,
        heads=heads,
        attention_width=heads * head_dim,
        kv_width=kv_width,
        intermediate=intermediate,
        # counted from the layer's parameters, so that a fused gate-and-up matrix counts as two
        mlp_matrices=max(2, round((layer_parameters - attention) / (hidden * intermediate))),
        vocab=config.vocab_size,
        matmul_parameters=parameters - embedding.numel() + (head.numel() if head is embedding else 0),
    )


def base_shape(recipe: Recipe) -> ModelShape:
    """The base model's shape from its config.json; ValueError or OSError when transformers cannot build it."""
    from transformers import AutoConfig

    trust = recipe.base_model.trust_remote_code
    return model_shape(AutoConfig.from_pretrained(recipe.base_model.path, trust_remote_code=trust), trust)


@dataclass(frozen=True)
class Setup:
    """How the training processes share the work: the recipe's train fields of those names."""

    strategy: Literal["ddp", "fsdp"]
    num_processes: int
    micro_batch_size: int
    activation_checkpointing: bool
    sequences_per_step: int
    seq_len: int
    compute_bytes: int
    """2 for bf16, 4 for fp32."""

    @property
    def accumulation(self) -> int:
        """Micro-batches per process and step."""
        return self.sequences_per_step // (self.micro_batch_size * self.num_processes)


CHANGEABLE = ("micro_batch_size", "strategy", "activation_checkpointing", "num_processes")
"""The train fields a fix may change, each a field of Setup."""


@dataclass(frozen=True)
class Memory:
    """Bytes per device: each kind at its largest, and the peak of all together."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    total: float
    """The peak: not the sum with one micro-batch per step (see the module docstring)."""


def activation_bytes(shape: ModelShape, setup: Setup) -> float:
    """Activations of one micro-batch at the peak (see the module docstring)."""
    c, h = setup.compute_bytes, shape.hidden
    autocast = setup.strategy == "ddp" and c < 4
    stream = c if setup.strategy == "fsdp" else 4

    def norm(matmuls: int) -> int:
        return 4 * h + 4 + stream * h + c * h * (matmuls if autocast else 1)

    attention = c * (2 * shape.attention_width + 2 * shape.kv_width) + 4 * shape.heads
    mlp = 2 * (shape.mlp_matrices - 1) * c * shape.intermediate
    layer = norm(3) + attention + norm(shape.mlp_matrices - 1) + mlp  # q, k, v; gate and up
    tail = norm(1) + 12 * shape.vocab
    per_token = (
        shape.layers * stream * h + max(tail, layer) if setup.activation_checkpointing else shape.layers * layer + tail
    )
    return setup.micro_batch_size * setup.seq_len * per_token


def memory(shape: ModelShape, setup: Setup) -> Memory:
    """Bytes per device of a setup (see the module docstring)."""
    p, n, c = shape.parameters, setup.num_processes, setup.compute_bytes
    activations = activation_bytes(shape, setup)
    if setup.strategy == "ddp":
        parameters, optimizer = 4 * p, 8 * p
        buckets = 4 * p if n > 1 else 0  # allocated with the model
        gradients = 4 * p + buckets
        held = gradients if setup.accumulation > 1 else buckets
    else:
        parameters = 4 * p / n + c * (shape.root_parameters + 2 * shape.layer_parameters)
        optimizer = 8 * p / n
        if setup.accumulation > 1:
            gradients = held = 4 * p
        else:
            unsharded = c + (4 if c < 4 else 0)  # the reduce-scatter's fp32 copy under bf16
            gradients, held = 4 * p / n + unsharded * shape.layer_parameters, 0
    return Memory(
        parameters, gradients, optimizer, activations, parameters + optimizer + max(activations + held, gradients)
    )


def flops_per_token(shape: ModelShape, setup: Setup) -> float:
    """FLOPs the devices compute per training token (see the module docstring)."""
    per_parameter = 8 if setup.activation_checkpointing else 6
    return per_parameter * (shape.matmul_parameters + 2 * shape.layers * shape.attention_width * setup.seq_len)


@dataclass(frozen=True)
class Device:
    """One training device, as far as the plan knows it."""

    name: str
    memory: float | None
    """Bytes; None when neither stated nor visible."""
    memory_from: str
    compute_bytes: int
    """Of the dtype training computes in on it: 2 for bf16, 4 for fp32."""
    peak_flops: float | None
    """At that dtype; None when unknown."""
    peak_from: str


def _gpu_compute_bytes(recipe: Recipe, bf16_supported: bool) -> int:
    """As stages/train/strategy.py decides on a GPU: bf16 when asked, or under auto when supported."""
    precision = recipe.train.precision
    return 2 if precision == "bf16" or (precision == "auto" and bf16_supported) else 4


def training_device(recipe: Recipe) -> Device:
    """The device training will run on: the visible GPU (train.devices' first), a GPU elsewhere
    when none is visible but train.device_memory is stated (bf16 assumed), else the CPU."""
    import torch

    stated = recipe.train.device_memory * GiB if recipe.train.device_memory else None
    if torch.cuda.is_available():
        index = (recipe.train.devices or [0])[0]
        properties = torch.cuda.get_device_properties(index if index < torch.cuda.device_count() else 0)
        name, memory = properties.name, stated or properties.total_memory
        memory_from = "train.device_memory" if stated else f"the {name}'s"
        compute = _gpu_compute_bytes(recipe, torch.cuda.is_bf16_supported())
        dtype = "bf16" if compute == 2 else "fp32"
        match = next((peaks for part, peaks in GPU_PEAK_FLOPS.items() if part in name), None)
        peak = match[0 if compute == 2 else 1] if match else None
        peak_from = f"the {name}'s {dtype} peak" if match else f"not known for the {name}"
    elif stated:
        name, memory, memory_from = "a GPU (none visible here)", stated, "train.device_memory"
        compute, peak, peak_from = _gpu_compute_bytes(recipe, True), None, "not known for a GPU not visible here"
    else:
        name, memory, memory_from, compute = "the CPU", None, "", 4
        cores = os.cpu_count() or 1
        per_core, capability = cpu_core_peak_flops()
        peak = per_core * cores / recipe.train.num_processes
        each = f"{per_core / 1e9:.0f} GFLOP/s each ({capability})"
        peak_from = f"{cores} CPU cores at {each}, shared by {recipe.train.num_processes} process(es)"
    if recipe.cost.device_peak_flops is not None:
        peak, peak_from = recipe.cost.device_peak_flops, "cost.device_peak_flops"
    return Device(name, memory, memory_from, compute, peak, peak_from)


@dataclass(frozen=True)
class RunCost:
    tokens: int
    seconds: float
    device_hours: float
    cost: float


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    device: Device
    setup: Setup
    """The recipe's."""
    table: dict[tuple[str, bool], Memory]
    """Per (strategy, activation checkpointing), the recipe's other fields kept."""
    mfu: float
    """Assumed: cost.assumed_mfu."""
    tokens_per_second: float | None
    """Per device, of the recipe's setup; None when the device's peak FLOP/s is unknown."""
    runs: dict[str, RunCost]
    """"full" (the run) and "pilot" (one sweep variant, at sweep.budget_fraction of the
    schedule's tokens), each with the optimizer warm-up's; none when tokens/s is unknown."""
    fix: tuple[dict[str, Any], Memory] | None
    """The smallest change of the train fields (name: value) that fits, and what it needs; None
    when the recipe's setup fits, nothing is known of the device's memory, or nothing fits."""

    @property
    def memory(self) -> Memory:
        return self.table[(self.setup.strategy, self.setup.activation_checkpointing)]

    @property
    def usable(self) -> float | None:
        return None if self.device.memory is None else USABLE * self.device.memory

    def fits(self, memory: Memory | None = None) -> bool | None:
        """Whether memory (default: the recipe's setup's) fits; None when the device's is unknown."""
        usable = self.usable
        return None if usable is None else (memory or self.memory).total <= usable


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def smallest_fix(shape: ModelShape, setup: Setup, usable: float) -> tuple[dict[str, Any], Memory] | None:
    """The change of CHANGEABLE fields that fits in usable bytes and changes least: fewest
    fields, then fewest devices, then no activation checkpointing (a second forward pass),
    then the strategy kept, then the largest micro-batch. Micro-batches only shrink and
    processes only grow, each dividing sequences_per_step, which stays."""
    found = []
    for strategy in dict.fromkeys((setup.strategy, "fsdp")):
        for checkpointing in dict.fromkeys((setup.activation_checkpointing, True)):
            for micro in _divisors(setup.sequences_per_step):
                for processes in _divisors(setup.sequences_per_step // micro):
                    option = replace(
                        setup,
                        strategy=strategy,
                        activation_checkpointing=checkpointing,
                        micro_batch_size=micro,
                        num_processes=processes,
                    )
                    needs = memory(shape, option)
                    if micro > setup.micro_batch_size or processes < setup.num_processes or needs.total > usable:
                        continue
                    changes = {f: getattr(option, f) for f in CHANGEABLE if getattr(option, f) != getattr(setup, f)}
                    rank = (len(changes), processes, checkpointing, strategy != setup.strategy, -micro)
                    found.append((rank, changes, needs))
    if not found:
        return None
    _, changes, needs = min(found, key=lambda entry: entry[0])
    return changes, needs


def plan_for(recipe: Recipe, shape: ModelShape, device: Device | None = None) -> Plan:
    """The capacity plan of a recipe for a model of that shape on that device (default: the
    one training will run on)."""
    device = device or training_device(recipe)
    train = recipe.train
    setup = Setup(
        strategy=train.strategy,
        num_processes=train.num_processes,
        micro_batch_size=train.micro_batch_size,
        activation_checkpointing=train.activation_checkpointing,
        sequences_per_step=train.sequences_per_step,
        seq_len=recipe.tokenize.seq_len,
        compute_bytes=device.compute_bytes,
    )
    table = {
        (strategy, checkpointing): memory(
            shape, replace(setup, strategy=strategy, activation_checkpointing=checkpointing)
        )
        for strategy in ("ddp", "fsdp")
        for checkpointing in (False, True)
    }
    per_device = None
    runs: dict[str, RunCost] = {}
    if device.peak_flops is not None:
        per_device = recipe.cost.assumed_mfu * device.peak_flops / flops_per_token(shape, setup)
        budgets = {"full": recipe.schedule.total_tokens}
        budgets["pilot"] = int(recipe.sweep.budget_fraction * budgets["full"])
        warmup = train.optimizer_warmup_steps * tokens_per_step(recipe)  # the same in every run
        for name, scheduled in budgets.items():
            tokens = scheduled + warmup
            seconds = tokens / (per_device * train.num_processes)
            hours = seconds * train.num_processes / 3600
            runs[name] = RunCost(tokens, seconds, hours, hours * recipe.cost.device_hour_price)
    plan = Plan(shape, device, setup, table, recipe.cost.assumed_mfu, per_device, runs, None)
    if plan.fits() is False:
        plan = replace(plan, fix=smallest_fix(shape, setup, plan.usable))
    return plan
