"""Damaged outputs: a finished stage's file truncated or changed on disk is never used as it is.
The stage that wrote it sees itself not done and writes it again (the same bytes); a stage
reading it first says in one line which file is damaged and what to run."""

from __future__ import annotations

import pytest
from conftest import prepare

from refit.stages.core.config import load_recipe
from refit.stages.core.markers import DamagedOutput
from refit.stages.curate import stage as curate
from refit.stages.mix import stage as mix
from refit.stages.tokenize import stage as tokenize

pytestmark = pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)


@pytest.fixture
def prepared(tmp_path, tiny_model_dir):
    path, workdir = prepare(tmp_path, tiny_model_dir, validation_fraction=0.3)
    return load_recipe(path), workdir


def _truncate(path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


@pytest.mark.parametrize(
    "stage, pattern, reader",
    [(curate, "*/*.parquet", tokenize), (tokenize, "*/shard-*.arrow", mix)],
    ids=["curated-parquet", "shard"],
)
def test_a_truncated_output_is_refused_by_its_reader_and_rewritten_by_its_writer(prepared, stage, pattern, reader):
    recipe, workdir = prepared
    damaged = sorted(stage.STAGE.output(workdir).glob(pattern))[0]
    original = _truncate(damaged)
    assert not stage.STAGE.is_done(recipe, workdir)
    with pytest.raises(DamagedOutput) as refused:  # `refit stage <reader>` run alone: one line, what to run
        reader.STAGE.input_fingerprint(recipe, workdir)
    (line,) = str(refused.value).splitlines()
    relative = damaged.relative_to(stage.STAGE.output(workdir))
    assert f"{relative} has {len(original) // 2} bytes, {len(original)} when written" in line
    assert f"--force {stage.STAGE.name}" in line
    stage.STAGE.run(recipe, workdir)
    assert damaged.read_bytes() == original and stage.STAGE.is_done(recipe, workdir)
    reader.STAGE.input_fingerprint(recipe, workdir)  # readable again


def test_a_shard_changed_in_place_is_named_before_training(prepared):
    recipe, workdir = prepared
    shard = sorted(tokenize.STAGE.output(workdir).glob("*/shard-*.arrow"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size: only the content hash tells
    assert tokenize.STAGE.is_done(recipe, workdir)  # sizes are what every use checks
    with pytest.raises(DamagedOutput, match=f"{shard.parent} is damaged: {shard.name} has sha256 .*--force tokenize"):
        mix.verify_shards(workdir)


def test_a_truncated_checkpoint_is_passed_over_and_the_run_resumes_from_the_one_before(tmp_path, tiny_model_dir):
    import torch

    from refit.stages.train.loop import latest_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (10, 20):
        save_checkpoint(model, optimizer, {"step": step}, tmp_path, "run", keep=None)
    assert latest_checkpoint(tmp_path, "run").name == "step-00000020"
    _truncate(sorted((tmp_path / "checkpoints" / "step-00000020").glob("*.distcp"))[0])
    assert latest_checkpoint(tmp_path, "run").name == "step-00000010"
