"""curate.executor: the datatrove steps run on datatrove's local, Ray or Slurm executor, and
the curated output (kept, removed and why) does not depend on which, nor on the workers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import LEGACY, NEW, edited, make_recipe, write_jsonl

from refit.stages.core.config import CurateSpec, RecipeError, load_recipe
from refit.stages.core.executors import Step, build_executors
from refit.stages.curate.minhash import FastMinhashSignature
from refit.stages.curate.stage import STAGE, run_curate

SETTINGS = {"max_chars": 3000, "max_bad_fraction": 0.2}  # the long document is split; 5 of 38 records are bad


def _sources(data: Path) -> list[dict]:
    """Legacy and new documents in several files with exact and near duplicates within and
    across sources, a benchmark leak, a broken line, a truncated file, a long document split
    in parts, and ids reused across files after a good and after a bad first record: every
    kind of decision curate makes, and claims that cross the files of different reading tasks."""
    legacy = [{"id": f"old{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:15])]
    new = [{"id": f"new{i}", "text": d["text"]} for i, d in enumerate(NEW[:15])]
    new += [{"id": f"newdup{i}", "text": edited(NEW[i]["text"], i)} for i in range(4)]
    new += [{"id": f"cross{i}", "text": edited(LEGACY[i]["text"], 100 + i)} for i in range(4)]
    new += [{"id": "exact", "text": NEW[7]["text"]}, b"{not json\n", {"id": "x", "text": "short"}]
    new += [
        {"id": "leak", "text": "So: the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"}
    ]
    later = [{"id": "x", "text": NEW[20]["text"]}, {"id": "new3", "text": NEW[21]["text"]}]
    later += [{"id": "long", "text": "\n\n".join(d["text"] for d in NEW[22:28])}, {"id": "y", "text": NEW[28]["text"]}]
    write_jsonl(data / "new.jsonl", new)
    write_jsonl(data / "new2.jsonl", later)
    cut = gzip.compress(
        b"".join(json.dumps({"id": f"cut{i}", "text": NEW[30 + i]["text"]}).encode() + b"\n" for i in range(4))
    )
    (data / "new3.jsonl.gz").write_bytes(cut[: len(cut) * 2 // 3])
    write_jsonl(data / "old.jsonl", legacy)
    return [
        {"name": "new", "paths": [str(data / "new*")], "role": "new"},
        {"name": "old", "paths": [str(data / "old.jsonl")], "role": "legacy"},
    ]


def _outputs(workdir: Path) -> dict[str, bytes]:
    """Every curated file (Parquet, quarantine, removed) by its path, and the report without its timing."""
    curate = workdir / "curate"
    files = {
        str(path.relative_to(curate)): path.read_bytes()
        for pattern in ("*/*.parquet", "quarantine/*/*.jsonl", "removed/*/*.jsonl")
        for path in curate.glob(pattern)
    }
    report = json.loads((curate / "report.json").read_text())
    del report["seconds"]
    files["report.json"] = json.dumps(report, sort_keys=True).encode()
    return files


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("ray")  # one private Ray cluster at a time: make test runs two workers
def test_decisions_and_output_are_identical_on_one_or_two_local_workers_and_ray(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is part of dev: pip install -e '.[dev]'")
    sources = _sources(tmp_path / "data")
    runs = {
        "local-1": {"workers": 1},
        "local-2": {"workers": 2},
        "ray-2": {"workers": 2, "executor": "ray"},  # a private local Ray cluster, shut down after the run
    }
    outputs, fingerprints = {}, set()
    for name, curate in runs.items():
        (tmp_path / name).mkdir()
        recipe = load_recipe(make_recipe(tmp_path / name, sources, **SETTINGS, **curate))
        report = run_curate(recipe, tmp_path / name / "wd")
        outputs[name] = _outputs(tmp_path / name / "wd")
        fingerprints.add(STAGE.input_fingerprint(recipe, tmp_path / name / "wd"))
    new = report["sources"]["new"]
    assert new["removed"] == {"contaminated_span": 1, "exact_duplicate": 1, "near_duplicate": 8}
    assert new["quarantined"] == {"duplicate_id": 2, "not_json": 1, "too_short": 1, "unreadable_file": 1}
    assert new["split_parts"] == 5 and new["train_docs"] + new["validation_docs"] == 23
    assert sorted(outputs["local-1"]) == sorted(outputs["local-2"]) == sorted(outputs["ray-2"])
    for path, content in outputs["local-1"].items():
        assert outputs["local-2"][path] == content, path
        assert outputs["ray-2"][path] == content, path
    assert len(fingerprints) == 1  # where the steps ran is not part of what the output depends on
    assert not ray.is_initialized()  # the run's private cluster was shut down


def test_slurm_executors_carry_the_recipe_settings_into_datatrove_sbatch_scripts(tmp_path):
    """No Slurm here: the job scripts datatrove would submit are built, not submitted."""
    spec = CurateSpec(
        workers=3,
        executor="slurm",
        slurm={
            "partition": "cpu",
            "time": "2:30:00",
            "cpus_per_task": 4,
            "mem_per_cpu_gb": 3,
            "qos": "high",
            "env_command": "source /shared/refit/.venv/bin/activate",
            "sbatch_args": {"account": "nlp", "constraint": "avx512"},
        },
    )
    steps = [
        Step("signatures", [FastMinhashSignature(output_folder=str(tmp_path / "sigs"))], 4),
        Step("buckets", [], 14),
    ]
    signatures, buckets = build_executors(steps, spec, tmp_path / "logs")
    assert buckets.depends is signatures  # submitted after it (afterok)
    script = signatures.get_launch_file_contents(signatures.get_sbatch_args(max_array=4), "launch_pickled_pipeline x")
    for line in (
        "#SBATCH --partition=cpu",
        "#SBATCH --time=2:30:00",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem-per-cpu=3G",
        "#SBATCH --qos=high",
        "#SBATCH --account=nlp",
        "#SBATCH --constraint=avx512",
        "#SBATCH --array=0-3%3",  # four tasks, at most curate.workers at once
        "#SBATCH --job-name=refit-signatures",
        "source /shared/refit/.venv/bin/activate",
    ):
        assert line in script.splitlines() or line in script, line
    assert signatures.logging_dir.path == str(tmp_path / "logs" / "signatures")


@pytest.mark.parametrize(
    ("curate", "field", "message"),
    [
        ({"executor": "slurm"}, "curate.slurm", "executor slurm needs curate.slurm"),
        ({"ray": {"address": "auto"}}, "curate.ray", "settings for executor ray, but curate.executor is local"),
        ({"executor": "slurm", "slurm": {"partition": "cpu", "sbatch_args": {"time": "1:00:00"}}},
         "curate.slurm.sbatch_args.time", "time is set by curate.slurm.time"),
        ({"executor": "slurm", "slurm": {"partition": "cpu", "time": "soon"}}, "curate.slurm.time", "pattern"),
    ],
)  # fmt: skip
def test_executor_contradictions_are_rejected_naming_the_field(tmp_path, curate, field, message):
    path = make_recipe(tmp_path, [{"name": "a", "paths": ["a.jsonl"], "role": "new"}], **curate)
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "y" * 30}])
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert field in str(error.value) and message in str(error.value)


def test_decisions_are_identical_when_the_spool_deals_several_rounds_of_files(tmp_path, monkeypatch):
    """A batch larger than DOCS_PER_ROUND documents is dealt into a new round of spool files
    (and datatrove tasks) every DOCS_PER_ROUND, so no task's share grows with the batch."""
    from refit.stages.curate import steps as curate_steps

    sources = _sources(tmp_path / "data")
    outputs = {}
    for name, workers, per_round in (("one-round", 2, 65536), ("rounds-1", 1, 7), ("rounds-3", 3, 7)):
        monkeypatch.setattr(curate_steps, "DOCS_PER_ROUND", per_round)
        (tmp_path / name).mkdir()
        recipe = load_recipe(make_recipe(tmp_path / name, sources, workers=workers, **SETTINGS))
        run_curate(recipe, tmp_path / name / "wd")
        outputs[name] = _outputs(tmp_path / name / "wd")
    assert outputs["rounds-1"] == outputs["one-round"] == outputs["rounds-3"]
    assert [curate_steps.task_of(p, 3) for p in range(16)] == [0, 1, 2, 0, 1, 2, 0, 3, 4, 5, 3, 4, 5, 3, 6, 7]
