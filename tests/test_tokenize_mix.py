"""tokenize (Arrow shards, zero-copy, resumable) and mix (manifest, closed-form switch step)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NEW, arrow_peaks, rewrite_output, write_jsonl
from transformers import AutoTokenizer

from refit.flows.cli import main as refit
from refit.stages.core.config import load_recipe
from refit.stages.core.markers import MARKER, StageNotReady, file_sha256
from refit.stages.core.schedule import schedule_for
from refit.stages.core.shards import read_shard
from refit.stages.curate.stage import curated_files, curated_texts, run_curate
from refit.stages.mix.manifest import ManifestMismatch
from refit.stages.mix.stage import manifest_path, read_manifest, run_mix
from refit.stages.tokenize.stage import run_tokenize


def test_shards_hold_packed_documents_and_open_zero_copy(curated, tiny_tokenizer_dir):
    recipe, workdir, _ = curated
    report = run_tokenize(recipe, workdir)
    index = json.loads((workdir / "tokenize" / "new" / "index.json").read_text())
    assert len(index["shards"]) >= 2 and index["dtype"] == "uint16"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    first = index["shards"][0]
    path = workdir / "tokenize" / "new" / first["file"]
    assert file_sha256(path) == first["sha256"]
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))  # IPC file format, uncompressed
    meta = reader.schema.metadata
    assert meta[b"seq_len"] == b"64" and meta[b"source"] == b"new" and meta[b"tokenizer_sha256"]
    rows = read_shard(path)
    assert rows.dtype == np.uint16 and rows.shape == (first["rows"], 64) and not rows.flags.owndata
    texts = [t for f in curated_files(workdir, "new", "train") for t in pa.parquet.read_table(f)["text"].to_pylist()]
    expected = [
        t
        for text in texts[: first["docs"]]
        for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    assert rows.reshape(-1).tolist() == expected[: rows.size]  # documents joined by EOS, cut into rows
    assert report["sources"]["new"]["tokens"] == index["tokens"] == sum(s["tokens"] for s in index["shards"])


def test_rerun_skips_complete_shards_and_reproduces_them(curated):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    shards = sorted((workdir / "tokenize").rglob("shard-*.arrow"))
    before = {p.name + p.parent.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in shards}
    # a run killed before its marker: the complete shards are still there and must be reused
    (workdir / "tokenize").rename(workdir / "tokenize.tmp")
    (workdir / "tokenize.tmp" / MARKER).unlink()
    removed = shards[0].relative_to(workdir / "tokenize")
    (workdir / "tokenize.tmp" / removed).unlink()
    run_tokenize(recipe, workdir)
    after = {
        p.name + p.parent.name: (p.read_bytes(), os.stat(p).st_mtime_ns)
        for p in sorted((workdir / "tokenize").rglob("shard-*.arrow"))
    }
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # byte-identical
    rewritten = {k for k in before if after[k][1] != before[k][1]}
    assert rewritten == {removed.name + removed.parent.name}  # only the missing shard was written again
    assert not (workdir / "tokenize.tmp").exists()


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd"])
def test_manifest_switch_step_is_the_schedules(tmp_path, curated, decay):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    recipe = recipe.model_copy(
        update={"schedule": recipe.schedule.model_copy(update={"decay": decay, "warmup_fraction": 0.1})}
    )
    manifest = run_mix(recipe, workdir)
    schedule = schedule_for(recipe)
    threshold = recipe.phases[1].lr_below * schedule.max_lr
    expected = next(s for s in range(schedule.warmup_steps, schedule.total_steps) if schedule.lr(s) <= threshold)
    general, qa = manifest.phases
    assert qa.start_step == expected == general.steps
    assert general.steps + qa.steps == manifest.total_steps == schedule.total_steps
    for name, source in manifest.sources.items():
        assert source.rows == json.loads((workdir / "tokenize" / name / "index.json").read_text())["rows"]
        assert source.epochs == pytest.approx(source.drawn_sequences / source.rows, rel=0.01)


def test_manifest_warns_about_repeats_and_empty_sources(curated, tmp_path):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    greedy = recipe.model_copy(update={"schedule": recipe.schedule.model_copy(update={"total_tokens": 3_000_000})})
    warnings = run_mix(greedy, workdir).warnings
    assert any("source old is drawn" in w and "mixture.max_epochs 4" in w for w in warnings)
    rewrite_output(
        workdir / "tokenize",
        "new/index.json",
        json.dumps(
            {
                **json.loads((workdir / "tokenize" / "new" / "index.json").read_text()),
                "rows": 0,
                "tokens": 0,
                "shards": [],
            }
        ),
    )
    assert any("source new has weight but no tokens" in w for w in run_mix(recipe, workdir, force=True).warnings)


def test_a_manifest_of_another_version_is_refused_with_what_to_rerun(curated):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    manifest = run_mix(recipe, workdir)
    assert read_manifest(workdir) == manifest  # what is written is what is read
    older = {**json.loads(manifest_path(workdir).read_text()), "version": 1, "recipe": "t"}  # version 1 named it
    rewrite_output(workdir / "mix", "manifest.json", json.dumps(older))
    with pytest.raises(ManifestMismatch, match=r"manifest version 1, this Refit reads version 2: rerun mix"):
        read_manifest(workdir)
    without_phases = {k: v for k, v in older.items() if k not in ("phases", "recipe")} | {"version": 2}
    rewrite_output(workdir / "mix", "manifest.json", json.dumps(without_phases))
    with pytest.raises(ManifestMismatch, match=r"not a valid manifest \(1 problems\): rerun mix"):
        read_manifest(workdir)


def test_stages_refuse_to_run_out_of_order(tmp_path, curated):
    recipe, workdir, _ = curated
    with pytest.raises(StageNotReady, match="run `refit stage tokenize` first"):
        run_mix(recipe, workdir)


def test_refit_plan_prints_the_table(curated, capsys):
    recipe, workdir, path = curated
    assert refit(["plan", str(path), "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((workdir / "mix" / "manifest.json").read_text())
    switch = manifest["phases"][1]["start_step"]
    assert f"switch to qa at step {switch} of {manifest['total_steps']}" in out
    assert "epochs" in out and "old" in out and "general" in out


def test_a_batch_that_adds_nothing_to_a_source_tokenizes(curated, tmp_path):
    recipe, workdir, path = curated
    run_tokenize(recipe, workdir)
    # the nightly case: new files arrive for one source only; the other gets an empty batch
    write_jsonl(
        tmp_path / "data" / "new-day2.jsonl", [{"id": f"m{i}", "text": d["text"]} for i, d in enumerate(NEW[30:36])]
    )
    recipe = load_recipe(path.parent / "recipe.yaml")
    recipe = recipe.model_copy(
        update={
            "sources": [
                recipe.sources[0],
                recipe.sources[1].model_copy(update={"paths": [str(tmp_path / "data" / "new*.jsonl")]}),
            ]
        }
    )
    report = run_curate(recipe, workdir)
    assert report["batch"] == 2 and report["sources"]["old"]["records"] == 0
    assert [p.name for p in curated_files(workdir, "old", "train")] == ["train-0001.parquet", "train-0002.parquet"]
    tokens = run_tokenize(recipe, workdir)["sources"]
    assert tokens["old"]["rows"] == json.loads((workdir / "tokenize" / "old" / "index.json").read_text())["rows"] > 0


def test_curated_texts_reads_the_rows_asked_in_record_batches(tmp_path):
    path = tmp_path / "train-0001.parquet"
    texts = [f"document {i}" for i in range(50)]
    pq.write_table(pa.table({"id": [str(i) for i in range(50)], "text": texts}), path, row_group_size=7)
    for start, stop in [(0, 50), (5, 23), (14, 15), (49, 50), (20, 20)]:
        batches = [b.to_pylist() for b in curated_texts(path, 4, start, stop)]
        assert [t for b in batches for t in b] == texts[start:stop] and all(len(b) <= 4 for b in batches)
    assert [t for b in curated_texts(path, 1000) for t in b.to_pylist()] == texts


def test_shards_are_identical_whatever_the_record_batch_size(curated):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)  # batch_size 512: each curated file in one record batch
    whole = {p.name + p.parent.name: p.read_bytes() for p in (workdir / "tokenize").rglob("shard-*.arrow")}
    small = recipe.model_copy(update={"tokenize": recipe.tokenize.model_copy(update={"batch_size": 4})})
    assert len(pq.read_table(curated_files(workdir, "new", "train")[0])) > 4 * 4  # many record batches
    run_tokenize(small, workdir, force=True)
    assert {p.name + p.parent.name: p.read_bytes() for p in (workdir / "tokenize").rglob("shard-*.arrow")} == whole


def test_tokenize_memory_does_not_grow_with_the_curated_file(tmp_path, tiny_tokenizer_dir):
    small, large = arrow_peaks("tokenize", tmp_path, tiny_tokenizer_dir, (8, 64))
    # reading whole files, the peak grew with the text (2.5 bytes a byte: 24 -> 136 MiB); record batches keep it flat
    assert large - small < 8 * 2**20, f"Arrow peak {small / 2**20:.1f} MiB at 8 MiB of text, {large / 2**20:.1f} at 64"


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("ray")  # one private Ray cluster at a time: make test runs two workers
def test_shards_are_identical_on_one_or_two_local_workers_and_ray(curated):
    """tokenize runs its shard jobs as datatrove tasks on curate.executor."""
    ray = pytest.importorskip("ray", reason="the ray extra is part of dev: pip install -e '.[dev]'")
    recipe, workdir, _ = curated
    outputs = []
    for executor, workers in (("local", 1), ("local", 2), ("ray", 2)):
        where = recipe.model_copy(
            update={
                "curate": recipe.curate.model_copy(update={"executor": executor}),
                "tokenize": recipe.tokenize.model_copy(update={"workers": workers}),
            }
        )
        run_tokenize(where, workdir, force=True)
        outputs.append({str(p.relative_to(workdir)): p.read_bytes() for p in (workdir / "tokenize").rglob("*.arrow")})
        assert not (workdir / "tokenize" / "logs").exists()
    assert len(outputs[0]) >= 4 and outputs[0] == outputs[1] == outputs[2]
    assert not ray.is_initialized()


def test_a_document_longer_than_the_model_context_is_encoded_without_the_library_warning(
    tmp_path, tiny_tokenizer_dir, caplog
):
    """Refit packs whole documents into rows itself: transformers' "Token indices sequence length
    is longer than the specified maximum" would be noise in every run's log."""
    import shutil

    from refit.stages.tokenize.stage import load_tokenizer

    tokenizer_dir = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizer")
    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 16}))
    ids = load_tokenizer(tokenizer_dir)("a long document " * 50)["input_ids"]
    assert len(ids) > 16 and "longer than the specified maximum" not in caplog.text
