"""The architecture matrix, end to end: a tiny random model of each architecture Refit is
meant to refresh goes from curated data to a published model that loads with
AutoModelForCausalLM and generates.

Two tokenizers, each as the real models of its family ship it, neither with a pad token: a
byte-level BPE without BOS (GPT-2, GPT-NeoX, Qwen, OLMo) and a SentencePiece-style Unigram
that adds a BOS (Llama, Mistral, Gemma, Phi-3). The data stages run once per tokenizer; each
architecture trains a copy of that run.

Every architecture trains under FSDP over 2 processes with activation checkpointing: that
run is the one evaluated (with the safety probes), audited and published, and it is checked
against what one process computes (its first loss is the base's on the first batch; the held-out
loss it scored on the sharded weights is the exported model's). Two architectures, one per
tokenizer, also train in one process: its losses and weights match FSDP's, and a run killed
by SIGKILL and resumed is bitwise the uninterrupted one.
"""

from __future__ import annotations

import functools
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    LEGACY,
    LENIENT,
    NEW,
    TEXT,
    final_model_loss,
    kill_at_step,
    metrics,
    prepare,
    validation_losses,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from refit.flows.cli import main as refit
from refit.stages.audit.stage import run_audit
from refit.stages.core.config import load_recipe
from refit.stages.evaluate.stage import read_report as read_evaluation
from refit.stages.evaluate.stage import run_evaluate
from refit.stages.mix.stage import read_manifest
from refit.stages.publish.stage import run_publish
from refit.stages.train.sampler import Sampler
from refit.stages.train.stage import read_report as read_training
from refit.stages.train.stage import run_train

pytestmark = pytest.mark.slow

STEPS = 8  # checkpoints after steps 4 and 8; the second phase starts at step 4
# the probes run, at the smallest sizes: a tiny model's scores mean nothing, their plumbing does
SMALL_SAFETY = {
    "crows_pairs_size": 8,
    "bbq_size": 12,
    "neutral_prompts": 1,
    "prompts_per_source": 1,
    "max_new_tokens": 8,
}
FSDP_WITH_CHECKPOINTING = {"strategy": "fsdp", "num_processes": 2, "activation_checkpointing": True}

# each architecture with the kind of tokenizer its real models ship
TOKENIZER_OF = {
    "llama": "unigram",
    "qwen2": "bpe",
    "qwen3": "bpe",
    "mistral": "unigram",
    "gemma2": "unigram",
    "olmo2": "bpe",
    "phi3": "unigram",
    "gpt_neox": "bpe",
    "gpt2": "bpe",
}
# also trained in one process and killed: tied embeddings with soft-capping (BOS), untied with
# a parallel residual (no BOS)
RESUMED = ["gemma2", "gpt_neox"]


# ----------------------------------------------------------------------------- tokenizers


def byte_level_bpe(tiny_tokenizer_dir: Path, out: Path) -> Path:
    """conftest's byte-level BPE with EOS as its only special token: no BOS, no pad."""
    from tokenizers import Tokenizer

    from refit.flows.demo_base import EOS

    backend = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, clean_up_tokenization_spaces=False
    ).save_pretrained(out)
    return out


def sentencepiece_unigram(out: Path) -> Path:
    """A Unigram model over Metaspace pieces (SentencePiece's layout), trained on the bundled
    documents, that puts <s> before every text it encodes with special tokens; no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator([TEXT, *(d["text"] for d in LEGACY + NEW)], trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,  # transformers writes the template that prepends it, as Llama's tokenizer does
        clean_up_tokenization_spaces=False,
    ).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- models


def tiny_config(architecture: str, tokenizer):
    """A 2-layer configuration, hidden size 32, whose special token ids are the tokenizer's."""
    import transformers as t

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": None,  # several configs default to an id beyond this vocabulary
    }
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 128}
    decoder = {**ids, **shape, "num_attention_heads": 4, "num_key_value_heads": 2}
    match architecture:
        case "llama":
            return t.LlamaConfig(**decoder)
        case "qwen2":
            return t.Qwen2Config(**decoder)
        case "qwen3":
            return t.Qwen3Config(**decoder, head_dim=8)
        case "mistral":  # a window shorter than a row, so that it masks
            return t.MistralConfig(**decoder, sliding_window=8)
        case "gemma2":  # every other layer windowed; attention and final logits soft-capped
            return t.Gemma2Config(
                **decoder,
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=8,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                tie_word_embeddings=True,
            )
        case "olmo2":
            return t.Olmo2Config(**decoder)
        case "phi3":
            return t.Phi3Config(**decoder)
        case "gpt_neox":
            return t.GPTNeoXConfig(**ids, **shape, num_attention_heads=4)
        case "gpt2":  # without dropout: one process and two draw other masks
            return t.GPT2Config(
                **ids, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
            )
    raise ValueError(architecture)


def build_model(architecture: str, tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised model of the architecture in HF format, with the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(architecture, tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def data_runs(tmp_path_factory, tiny_tokenizer_dir):
    """tokenizer name -> a folder with the tokenizer (`tokenizer/`), a model of each of its
    architectures (`models/<architecture>/`) and a run (`run/`: recipe.yaml and its workdir
    `wd/`, curated, tokenized and mixed), made on first use."""

    @functools.cache
    def data_run(name: str) -> Path:
        root = tmp_path_factory.mktemp(f"data-{name}")
        out = root / "tokenizer"
        tokenizer_dir = byte_level_bpe(tiny_tokenizer_dir, out) if name == "bpe" else sentencepiece_unigram(out)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        assert tokenizer.pad_token is None
        adds_bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
        assert adds_bos == (name == "unigram") == (tokenizer.bos_token_id is not None)
        architectures = [a for a, tokenizer_name in TOKENIZER_OF.items() if tokenizer_name == name]
        for architecture in architectures:
            build_model(architecture, tokenizer_dir, root / "models" / architecture)
        base = root / "models" / architectures[0]  # any: each run continues from its own architecture's
        prepare(root / "run", base, validation_fraction=0.3, gates=LENIENT, steps=STEPS, safety=SMALL_SAFETY)
        return root

    return data_run


def run_of(data_run: Path, folder: Path, architecture: str, **train) -> tuple[Path, Path]:
    """(recipe, workdir) of a copy of the data run in folder, continuing from the architecture's
    model with these train settings and publishing to its own registry. (Stages read what came
    before through markers holding relative paths, so the copy is as done as the original.)"""
    shutil.copytree(data_run / "run", folder)
    path = folder / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["base_model"]["path"] = str(data_run / "models" / architecture)
    recipe["train"].update(train)
    recipe["evaluate"] |= {"num_processes": 1, "validation_docs": 2}  # in this process, however many trained
    recipe["publish"]["registry"] = str(folder / "registry")
    path.write_text(yaml.safe_dump(recipe))
    return path, folder / "wd"


@pytest.fixture(scope="module")
def fsdp_run(request, tmp_path_factory, data_runs) -> tuple[str, Path, Path]:
    """(architecture, recipe, workdir) of the architecture trained under FSDP over 2 processes
    with activation checkpointing."""
    architecture = request.param
    data_run = data_runs(TOKENIZER_OF[architecture])
    path, workdir = run_of(
        data_run, tmp_path_factory.mktemp(architecture) / "fsdp", architecture, **FSDP_WITH_CHECKPOINTING
    )
    run_train(load_recipe(path), workdir)
    return architecture, path, workdir


def first_batch_loss(recipe_path: Path, workdir: Path) -> float:
    """The base model's mean token loss on the sequences of the run's first step, in one process."""
    manifest = read_manifest(workdir)
    batch = torch.from_numpy(Sampler(manifest, workdir).batch(0, range(manifest.sequences_per_step)))
    model = AutoModelForCausalLM.from_pretrained(load_recipe(recipe_path).base_model.path, use_safetensors=True)
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def logged(line: dict) -> tuple:
    """What a metrics line says of the training (not of its timing)."""
    return line["step"], line["loss"], line["lr"], line["phase"], line["sources"], line.get("val_loss")


def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "train" / "final" / "model.safetensors")


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("fsdp_run", list(TOKENIZER_OF), indirect=True)
def test_trains_under_fsdp_with_checkpointing_and_publishes_a_model_that_generates(fsdp_run, capsys):
    architecture, path, workdir = fsdp_run
    assert refit(["validate", str(path)]) == 0
    assert "(2 layers of" in capsys.readouterr().out  # the capacity plan found the decoder layers
    recipe = load_recipe(path)
    trained = read_training(workdir)
    assert (trained["strategy"], trained["processes"], trained["steps"]) == ("fsdp", 2, STEPS)
    assert [s["step"] for s in trained["switches"]] == [read_manifest(workdir).phases[1].start_step]
    # what one process computes: the first loss on the base's weights, and the held-out loss the
    # ranks scored on the sharded final weights is the exported model's (tied embeddings included)
    assert metrics(workdir)[0]["loss"] == pytest.approx(first_batch_loss(path, workdir), rel=0, abs=1e-5)
    assert validation_losses(workdir)[STEPS] == pytest.approx(final_model_loss(workdir), rel=0, abs=1e-5)

    run_evaluate(recipe, workdir)
    assert {"crows_pairs", "bbq", "generation"} <= read_evaluation(workdir)["safety"].keys()
    audit = run_audit(recipe, workdir)  # raises AuditFailed, naming the gates, unless every gate passes
    safety_gates = {"bias_not_worse:crows_pairs", "bias_not_worse:bbq", "degeneration:repetition_rise"}
    assert safety_gates <= {g["name"] for g in audit["gates"]}
    published = Path(run_publish(recipe, workdir)["path"])

    model = AutoModelForCausalLM.from_pretrained(published, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(published)
    assert model.config.model_type == architecture
    prompt = tokenizer("SELECT name FROM", return_tensors="pt")
    generated = model.generate(
        **prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("fsdp_run", RESUMED, indirect=True)
def test_one_process_matches_fsdp_and_resumes_bitwise_after_sigkill(tmp_path, fsdp_run, data_runs):
    architecture, _, fsdp = fsdp_run
    data_run = data_runs(TOKENIZER_OF[architecture])
    reference_path, reference = run_of(data_run, tmp_path / "one", architecture)
    path, workdir = run_of(data_run, tmp_path / "killed", architecture)
    switch = read_manifest(workdir).phases[1].start_step
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run beside the killed one: their starts share the 2 cores
        uninterrupted = pool.submit(run_train, load_recipe(reference_path), reference)
        kill_at_step(path, workdir, switch, launcher="refit.flows.train_launcher")  # resumes at the switch
        uninterrupted.result()
    run_train(load_recipe(path), workdir)
    expected = metrics(reference)
    assert [logged(m) for m in metrics(workdir)] == [logged(m) for m in expected]
    ours, theirs = final_weights(workdir), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    assert [m["loss"] for m in metrics(fsdp)] == pytest.approx([m["loss"] for m in expected], rel=1e-4, abs=1e-5)
    sharded = final_weights(fsdp)
    assert sharded.keys() == theirs.keys()
    # per tensor, not per element: Adam turns a rounding difference in a near-zero gradient into a
    # step of up to the LR (GPT-NeoX's biases: 1.3e-4 of their norm), while a wrong update moves
    # every element by about that much, a good part of these small tensors' norm
    for name in theirs:
        assert torch.dist(sharded[name], theirs[name]) <= 1e-3 * theirs[name].norm(), name


@pytest.mark.gpu
def test_gemma2_trains_on_a_gpu(tmp_path, data_runs):
    """Gemma2 loads with the eager attention that soft-caps its logits on a GPU too: transformers
    refuses SDPA for it, which the training once asked for wherever CUDA was available."""
    path, workdir = run_of(data_runs("unigram"), tmp_path / "run", "gemma2")
    assert run_train(load_recipe(path), workdir)["steps"] == STEPS
