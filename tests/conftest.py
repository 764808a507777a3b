"""Shared fixtures: tiny tokenizers and causal LMs built in the test, never downloaded."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a hub, in any test
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEXT = (
    "Continued pretraining reuses a trained model. The learning rate decays along a cosine. "
    "SELECT name FROM users WHERE id = 1; CREATE TABLE t (x integer); "
    "def add(a, b):\n    return a + b\n"
) * 20


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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 300) trained here on a few sentences."""
    from refit.stages.lib.demo_base import train_tokenizer

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


@pytest.fixture
def trained(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """(recipe path, workdir) of a tiny run trained through the train stage, with 30% of the
    documents held out, ready for evaluate and audit."""
    from test_train import prepare

    from refit.stages.lib.config import load_recipe
    from refit.stages.train import run_train

    path, workdir = prepare(tmp_path, tiny_model_dir, validation_fraction=0.3)
    run_train(load_recipe(path), workdir)
    return path, workdir


@pytest.fixture(scope="session")
def prefect_harness():
    """One embedded Prefect server (SQLite) for the whole session: the first start is slow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
