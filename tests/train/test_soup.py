"""Model soups (#26): the streamed average of tiny models is their direct average (from Hugging
Face folders, sharded output, and FSDP-sharded DCP checkpoints of 2 processes), the same bytes
on every run and after a killed run; mismatched inputs are refused by name; the greedy soup
keeps an ingredient only if the loss drops; an ingredient reorders only the last phase.

The direct average is computed here as the soup computes it (a float64 sum in input order,
divided, cast back), so the two agree bitwise: any difference is a bug, not rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import free_port
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from refit.stages.core.markers import file_sha256
from refit.stages.mix.stage import run_mix
from refit.stages.tokenize.stage import run_tokenize
from refit.stages.train.sampler import Sampler
from refit.stages.train.soup import GreedySoup, average_weights, greedy_soup

EMBEDDINGS = {"llama": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}


def tiny_config(arch: str, **overrides):
    if arch == "gpt2":  # lm_head tied to wte, as GPT-2 ships
        return GPT2Config(
            vocab_size=96, n_embd=16, n_layer=2, n_head=2, n_positions=32, eos_token_id=0, bos_token_id=0, **overrides
        )
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    return LlamaConfig(**(dict(vocab_size=96, num_key_value_heads=1, max_position_embeddings=32) | small | overrides))


def tiny_model(folder: Path, seed: int, arch: str = "llama", dtype=torch.float32, **overrides) -> Path:
    """A random tiny model saved as Hugging Face saves it, with a stand-in tokenizer file."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).to(dtype)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"seed": seed}))
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


def direct_average(folders: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    states = [tensors(f) for f in folders]
    weights = weights or [1.0] * len(folders)
    return {
        name: (sum(w * s[name].double() for w, s in zip(weights, states)) / sum(weights)).to(tensor.dtype)
        for name, tensor in states[0].items()
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def digests(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_average_is_the_direct_average_loads_and_repeats_bitwise(tmp_path, arch):
    models = [tiny_model(tmp_path / f"m{i}", seed=i, arch=arch) for i in range(3)]
    written = average_weights(models, tmp_path / "soup")
    soup = tmp_path / "soup"
    assert_same(tensors(soup), direct_average(models))
    assert sorted(tensors(soup)) == sorted(tensors(models[0]))  # the tied copy stays out, as save_pretrained leaves it
    assert written == {"model.safetensors": file_sha256(soup / "model.safetensors")}
    assert (soup / "tokenizer.json").read_text() == (models[0] / "tokenizer.json").read_text()
    assert (soup / "generation_config.json").is_file() and not list(tmp_path.glob("soup.*"))
    loaded = AutoModelForCausalLM.from_pretrained(soup, use_safetensors=True)
    embeddings = loaded.get_input_embeddings().weight
    assert torch.equal(embeddings, direct_average(models)[EMBEDDINGS[arch]])
    if arch == "gpt2":
        assert loaded.lm_head.weight.data_ptr() == embeddings.data_ptr()
    average_weights(models, tmp_path / "again")
    assert digests(tmp_path / "again") == digests(soup)
    average_weights(models[:2], tmp_path / "weighted", weights=[1, 3])
    assert_same(tensors(tmp_path / "weighted"), direct_average(models[:2], [1.0, 3.0]))


def test_sharded_output_holds_the_same_tensors(tmp_path):
    models = [tiny_model(tmp_path / f"m{i}", seed=i) for i in range(2)]
    whole = average_weights(models, tmp_path / "whole")
    sharded = average_weights(models, tmp_path / "sharded", shard_bytes=4096)
    assert list(whole) == ["model.safetensors"] and len(sharded) > 2
    assert sorted(sharded) == [f"model-{i:05d}-of-{len(sharded):05d}.safetensors" for i in range(1, len(sharded) + 1)]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(sharded)
    assert_same(tensors(tmp_path / "sharded"), tensors(tmp_path / "whole"))
    resharded = average_weights([tmp_path / "sharded", models[0]], tmp_path / "from-shards")  # shards in, too
    assert_same(tensors(tmp_path / "from-shards"), direct_average([tmp_path / "whole", models[0]]))
    assert list(resharded) == ["model.safetensors"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", use_safetensors=True)


def test_mismatched_inputs_are_refused_by_tensor_and_folder(tmp_path):
    llama = tiny_model(tmp_path / "llama", seed=0)
    wider = tiny_model(tmp_path / "wider", seed=1, intermediate_size=48)
    half = tiny_model(tmp_path / "half", seed=2, dtype=torch.bfloat16)
    gpt2 = tiny_model(tmp_path / "gpt2", seed=3, arch="gpt2")
    with pytest.raises(ValueError, match=rf"model.layers.0.mlp.down_proj.weight: {wider} has shape \[16, 48\]"):
        average_weights([llama, wider], tmp_path / "soup")
    with pytest.raises(
        ValueError,
        match=rf"lm_head.weight: {half} has shape \[96, 16\] torch.bfloat16, {llama} has \[96, 16\] torch.float32",
    ):
        average_weights([llama, half], tmp_path / "soup")
    with pytest.raises(ValueError, match=rf"tensor lm_head.weight: {llama} holds it, {gpt2} does not"):
        average_weights([llama, gpt2], tmp_path / "soup")
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        average_weights([llama, llama], tmp_path / "soup", weights=[1.0])
    assert not list(tmp_path.glob("soup*"))


def test_a_killed_average_leaves_the_previous_soup_and_a_rerun_is_identical(tmp_path, monkeypatch):
    models = [tiny_model(tmp_path / f"m{i}", seed=i) for i in range(3)]
    clean = average_weights(models, tmp_path / "clean", shard_bytes=4096)
    soup = tmp_path / "soup"
    average_weights(models[:1], soup)  # the previous soup
    previous = digests(soup)
    save_file, saved = safetensors.torch.save_file, []

    def killed_on_third_shard(tensors, path, metadata=None):
        if len(saved) == 2:
            Path(path).write_bytes(b"\0" * 100)  # half a shard, then the process is gone
            raise SystemExit("killed")
        saved.append(path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", killed_on_third_shard)
    with pytest.raises(SystemExit):
        average_weights(models, soup, shard_bytes=4096)
    monkeypatch.undo()
    assert digests(soup) == previous  # no half soup under its name
    assert sorted(p.name for p in (tmp_path / "soup.tmp").iterdir()) == ["shard-0.tmp", "shard-1.tmp", "shard-2.tmp"]
    assert average_weights(models, soup, shard_bytes=4096) == clean
    assert digests(soup) == digests(tmp_path / "clean") and not (tmp_path / "soup.tmp").exists()


def test_greedy_soup_keeps_an_ingredient_only_if_the_loss_drops(tmp_path):
    a, b, c = (tiny_model(tmp_path / name, seed=i) for i, name in enumerate("abc"))
    target = direct_average([a, b])  # the soup of a and b scores 0; c pulls it away
    scored = []

    def loss_of(folder: Path) -> float:
        scored.append(digests(folder)["model.safetensors"])
        return sum(float((t.double() - target[n].double()).square().sum()) for n, t in tensors(folder).items())

    soup = greedy_soup([a, b, c], tmp_path / "soup", loss_of)
    assert isinstance(soup, GreedySoup) and soup.kept == [a, b]
    assert soup.losses[1] == 0 < soup.losses[0] and soup.losses[2] > 0
    assert digests(tmp_path / "soup")["model.safetensors"] == scored[1]  # the very bytes scored
    assert soup.digests == average_weights([a, b], tmp_path / "ab")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ab", "b", "c", "soup"]
    again = greedy_soup([a, b, c], tmp_path / "soup", loss_of)
    assert (again.kept, again.losses, again.digests) == (soup.kept, soup.losses, soup.digests)
    assert greedy_soup([c, a], tmp_path / "c-first", loss_of).kept == [c, a]  # a lowers c's loss


def write_fsdp_checkpoints(rank: int, port: int, models: list[Path], train_dirs: list[Path]) -> None:
    """Each model sharded over 2 gloo processes (FSDP2) and checkpointed as training does."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from refit.stages.train.loop import decoder_layers, save_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    for folder, train_dir in zip(models, train_dirs):
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters())
        save_checkpoint(model, optimizer, {"step": 8}, train_dir, "soup-test", keep=None)
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_average_of_fsdp_checkpoints_is_the_direct_average(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    models = [tiny_model(tmp_path / f"m{i}", seed=i, tie_word_embeddings=True) for i in range(2)]
    train_dirs = [tmp_path / f"run{i}" for i in range(2)]
    # forked: the processes start with this one's imports, in a fraction of the time spawn takes
    args = (free_port(), models, train_dirs)
    torch.multiprocessing.start_processes(write_fsdp_checkpoints, args=args, nprocs=2, start_method="fork")
    checkpoints = [d / "checkpoints" / "step-00000008" for d in train_dirs]
    assert {p.name for p in checkpoints[0].glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert "model.lm_head.weight" in FileSystemReader(checkpoints[0]).read_metadata().state_dict_metadata
    with pytest.raises(ValueError, match="no config.json: give like="):
        average_weights(checkpoints, tmp_path / "soup")
    average_weights(checkpoints, tmp_path / "soup", like=models[0])
    assert_same(tensors(tmp_path / "soup"), direct_average(models))  # the tied lm_head left out
    average_weights(models, tmp_path / "from-hf")
    assert digests(tmp_path / "soup") == digests(tmp_path / "from-hf")  # the same bytes as from the exports
    average_weights([checkpoints[0], models[1]], tmp_path / "mixed", like=models[0])
    assert digests(tmp_path / "mixed") == digests(tmp_path / "soup")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "soup", use_safetensors=True)
    assert torch.equal(loaded.lm_head.weight, direct_average(models)["model.embed_tokens.weight"])


def test_an_ingredient_reorders_only_the_last_phase(curated):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    manifest = run_mix(recipe, workdir)
    per_step, total = manifest.sequences_per_step, manifest.total_steps * manifest.sequences_per_step
    switch = manifest.phases[-1].start_step * per_step
    assert 0 < switch < total

    def order(ingredient: int | None, warmup_steps: int = 0) -> list[tuple[int, int]]:
        sampler = Sampler(manifest, workdir, warmup_steps, **({} if ingredient is None else {"ingredient": ingredient}))
        return [sampler.slot(i) for i in range(total)]

    today = order(None)
    assert order(0) == today
    first, second = order(1), order(2)
    assert order(1) == first  # a pure function of (seed, manifest, ingredient)
    for other in (first, second):
        assert other[:switch] == today[:switch]
        assert other[switch:] != today[switch:] and sorted(other[switch:]) == sorted(today[switch:])
    assert first[switch:] != second[switch:]
    plain, ingredient = Sampler(manifest, workdir, 2), Sampler(manifest, workdir, 2, ingredient=1)
    last_step = manifest.total_steps - 1
    assert np.array_equal(plain.batch(0, range(per_step)), ingredient.batch(0, range(per_step)))
    assert not np.array_equal(plain.batch(last_step, range(per_step)), ingredient.batch(last_step, range(per_step)))
    warmup = range(2 * per_step)
    assert [plain.slot(i, warmup=True) for i in warmup] == [ingredient.slot(i, warmup=True) for i in warmup]
