"""The capacity plan (stages/core/capacity.py): parameter counts of real configurations, written
here, against their published figures; the memory arithmetic against torch's own count of a
training step on the CPU; `refit validate` refusing a recipe that cannot fit its devices."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import NEW, make_recipe, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from refit.flows.cli import main as refit
from refit.flows.report import format_capacity
from refit.stages.core.capacity import Device, GiB, model_shape, plan_for
from refit.stages.core.config import Recipe, load_recipe

LLAMA_31_8B = LlamaConfig(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    tie_word_embeddings=False,
)
LLAMA_31_70B = LlamaConfig(
    hidden_size=8192,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    intermediate_size=28672,
    vocab_size=128256,
    tie_word_embeddings=False,
)
QWEN_25_7B = Qwen2Config(  # q, k and v projections with bias: Qwen2's own
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    tie_word_embeddings=False,
)
H100 = Device("an H100", 79.6 * GiB, "train.device_memory", 2, 989e12, "its bf16 peak")


@pytest.mark.parametrize(
    "config, published, digits",
    [(LLAMA_31_8B, 8.03, 2), (LLAMA_31_70B, 70.6, 1), (QWEN_25_7B, 7.62, 2)],
    ids=["Llama-3.1-8B", "Llama-3.1-70B", "Qwen2.5-7B"],
)
def test_parameter_counts_match_the_published_figures(config, published, digits):
    assert round(model_shape(config).parameters / 1e9, digits) == published


def _recipe(tmp_path, config, seq_len=4096, **train):
    write_jsonl(tmp_path / "data" / "new.jsonl", [{"id": "n0", "text": NEW[0]["text"]}])
    path = make_recipe(
        tmp_path,
        [{"name": "new", "paths": ["data/new.jsonl"], "role": "new"}],
        sections={"tokenize": {"seq_len": seq_len}, "schedule": {"total_tokens": "1B"}, "train": train},
    )
    config.save_pretrained(tmp_path / "base")  # the config alone: the plan reads no weights
    return path


@pytest.fixture
def process_group_cleared():
    """FSDP2 starts a process group of one process (stages/train/strategy.py): ended after the test."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _measured_step(recipe: Recipe) -> dict[str, float]:
    """Torch's own count at the peak of one training step of the recipe's base as stages/train
    runs it on the CPU (fp32, its micro-batches accumulated, under fsdp reduced at the last
    only, then AdamW): tensor by tensor, by MemTracker (FSDPMemTracker under fsdp); MiB by kind."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    from refit.stages.train.loop import base_model, prepare_model

    torch.manual_seed(0)
    model = prepare_model(base_model(recipe), recipe, torch.device("cpu"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters())
    for parameter in model.parameters():  # AdamW makes its state at the first step: made here, untracked
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    train = recipe.train
    steps = train.sequences_per_step // train.micro_batch_size
    batches = torch.randint(0, model.config.vocab_size, (steps, train.micro_batch_size, recipe.tokenize.seq_len))
    sharded = isinstance(model, FSDPModule)
    if sharded:
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((batches,))
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer, batches)
    with tracker:
        for i, batch in enumerate(batches):
            if sharded:
                model.set_requires_gradient_sync(i == steps - 1)
            (model(input_ids=batch, labels=batch).loss / steps).backward()
            tracker.reset_mod_stats()  # the tracker follows one forward pass at a time
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {getattr(kind, "value", kind): size / 2**20 for kind, size in peak.items()}


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking:UserWarning")  # the tracker's, of checkpointing
@pytest.mark.parametrize(
    "train",
    [
        {"micro_batch_size": 4, "sequences_per_step": 8},
        {"micro_batch_size": 4, "sequences_per_step": 8, "activation_checkpointing": True},
        {"micro_batch_size": 8, "sequences_per_step": 8},
        {"micro_batch_size": 4, "sequences_per_step": 8, "strategy": "fsdp"},
    ],
    ids=["ddp-2-micro-batches", "activation-checkpointing", "one-micro-batch", "fsdp-2-micro-batches"],
)
def test_the_planned_memory_is_within_15_percent_of_torchs_own_count_on_the_cpu(tmp_path, train, process_group_cleared):
    config = LlamaConfig(  # 1.8M parameters, four layers, grouped-query attention
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=352,
        vocab_size=4096,
        tie_word_embeddings=False,
    )
    recipe = load_recipe(_recipe(tmp_path, config, seq_len=128, **train))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    measured = _measured_step(recipe)
    plan = plan_for(recipe, model_shape(config), Device("the CPU", None, "", 4, None, ""))
    activations = measured["Activation"] + measured["Temp"]  # Temp: the logits' gradients
    assert plan.memory.activations / 2**20 == pytest.approx(activations, rel=0.15)
    assert plan.memory.total / 2**20 == pytest.approx(measured["Total"], rel=0.15)


def test_validate_refuses_a_recipe_that_cannot_fit_naming_the_smallest_change(tmp_path, capsys):
    path = _recipe(
        tmp_path, LLAMA_31_8B, micro_batch_size=4, sequences_per_step=64, num_processes=8, device_memory=79.6
    )
    assert refit(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train (line" in err and "more than the 71.6 GiB (90%) usable of the 79.6 GiB of train.device_memory" in err
    # fsdp and checkpointing at micro-batch 4 need 71.9 GiB: halving the micro-batch as well fits
    fix = "train.micro_batch_size: 2, train.strategy: fsdp, train.activation_checkpointing: true"
    assert f"the smallest change that fits: {fix}" in err


def test_a_smaller_micro_batch_is_the_smallest_change_when_it_fits_alone(tmp_path):
    path = _recipe(
        tmp_path,
        LLAMA_31_8B,
        micro_batch_size=4,
        sequences_per_step=64,
        num_processes=8,
        strategy="fsdp",
        activation_checkpointing=True,
    )
    plan = plan_for(load_recipe(path), model_shape(LLAMA_31_8B), H100)
    assert plan.fits() is False
    assert plan.fix[0] == {"micro_batch_size": 2}


def test_plan_gives_the_time_and_cost_of_the_full_run_and_of_a_pilot_variant(tmp_path):
    path = _recipe(
        tmp_path,
        LLAMA_31_8B,
        micro_batch_size=1,
        sequences_per_step=64,
        num_processes=8,
        strategy="fsdp",
        activation_checkpointing=True,
    )
    recipe, shape = load_recipe(path), model_shape(LLAMA_31_8B)
    plan = plan_for(recipe, shape, H100)
    # PaLM's count: 6 FLOPs per token and parameter that multiplies it (not the input embedding's),
    # 12 x layers x width x seq_len for attention; 8 and 16 under activation checkpointing
    flops = 8 * (shape.parameters - 128256 * 4096) + 16 * 32 * 4096 * 4096
    assert plan.tokens_per_second == pytest.approx(0.4 * 989e12 / flops, rel=0.01)
    full, pilot = plan.runs["full"], plan.runs["pilot"]
    assert full.device_hours == pytest.approx(1e9 / plan.tokens_per_second / 3600, rel=1e-6)
    assert full.cost == pytest.approx(full.device_hours * recipe.cost.device_hour_price)
    assert pilot.tokens == recipe.sweep.budget_fraction * 1e9 and pilot.cost == pytest.approx(0.25 * full.cost)
    text = format_capacity(plan)
    assert "* fsdp      on" in text and "yes" in text
    assert "full run" in text and "pilot variant (25%)" in text and "USD" in text


def test_the_optimizer_warmup_is_planned_in_every_run(tmp_path):
    """Its steps at LR 0 cost a step's forward and backward passes each, in the full run and the pilot's."""
    shape = model_shape(LLAMA_31_8B)
    cold = plan_for(load_recipe(_recipe(tmp_path / "cold", LLAMA_31_8B, sequences_per_step=64)), shape, H100)
    warm_path = _recipe(tmp_path / "warm", LLAMA_31_8B, sequences_per_step=64, optimizer_warmup_steps=10)
    warm = plan_for(load_recipe(warm_path), shape, H100)
    for name in ("full", "pilot"):
        assert warm.runs[name].tokens == cold.runs[name].tokens + 10 * 64 * 4096
        assert warm.runs[name].seconds / warm.runs[name].tokens == pytest.approx(1 / warm.tokens_per_second)


def test_without_stated_memory_or_a_visible_gpu_the_fit_is_not_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _recipe(tmp_path, LLAMA_31_8B, micro_batch_size=4, sequences_per_step=64, num_processes=8)
    assert refit(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "capacity: 8.03B parameters" in out and "computing in fp32 on the CPU" in out
    assert "fits: not checked: no train.device_memory stated and no GPU visible" in out


def test_validate_says_why_a_base_it_cannot_build_is_not_planned(tmp_path, capsys):
    path = _recipe(tmp_path, LLAMA_31_8B)
    (tmp_path / "base" / "config.json").write_text("{}")
    assert refit(["validate", str(path)]) == 0
    assert "capacity: not planned" in capsys.readouterr().out
