"""The stage contract: the registry, per-stage code versions from the import graph, and the one
atomic-output rule (staged output, marker last, swap, recover)."""

from __future__ import annotations

from pathlib import Path

import pytest

from refit.stages.core.code_version import project_modules
from refit.stages.core.markers import MARKER, read_marker, recover, staged_output, write_marker
from refit.stages.pipeline import NAMES, PIPELINE, STAGES, StageOptions, depending_on, downstream


def test_registry_lists_the_seven_stages_in_an_order_that_respects_what_they_read():
    assert NAMES == ("curate", "tokenize", "mix", "train", "evaluate", "audit", "publish")
    for index, stage in enumerate(PIPELINE):
        assert {read.name for read in stage.reads} <= set(NAMES[:index]), f"{stage.name} reads a later stage"
        assert stage.run_function.__name__ == f"run_{stage.name}"
    assert len({stage.folder for stage in PIPELINE}) == 7 and STAGES["evaluate"].folder == "eval"
    assert downstream(["evaluate"]) == ["evaluate", "audit", "publish"]
    assert downstream(["tokenize"]) == ["tokenize", "mix", "train", "evaluate", "audit", "publish"]
    # what a pilot sweep may share between its variants: the stages no swept section reaches
    swept = set(depending_on({"schedule", "mixture", "train"}))
    assert [name for name in NAMES if name not in swept] == ["curate", "tokenize"]


def test_a_stage_takes_only_the_options_it_declares(tmp_path):
    with pytest.raises(ValueError, match=r"unknown input options \['gpu'\]"):
        type(STAGES["curate"])(
            name="x", reads=(), recipe_reads=(), folder="x", report=dict, run_function=print, takes=("gpu",)
        )
    with pytest.raises(ValueError, match=r"stage x declares it reads 'train.sed' names no recipe field"):
        type(STAGES["curate"])("x", (), ("train.sed",), "x", dict, run_function=print)
    seen = {}

    def run_x(recipe, workdir, force=False, backend="refit"):
        seen.update(force=force, backend=backend)
        return {}

    stage = type(STAGES["curate"])(
        name="x", reads=(), recipe_reads=(), folder="x", report=dict, run_function=run_x, takes=("backend",)
    )
    stage.run(None, tmp_path, StageOptions(force=True, backend="lm-eval", previous_eval={"ignored": 1}))
    assert seen == {"force": True, "backend": "lm-eval"}


def test_run_only_options_reach_the_run_and_never_the_fingerprint(tmp_path):
    """A callback changes no output: declared run-only, it is passed to the run function only,
    and a stage cannot list it among the options that enter its fingerprint (nor the reverse)."""
    from dataclasses import fields

    from refit.stages.core.contract import INPUT_OPTIONS, RUN_ONLY_OPTIONS, Stage

    # every option but force says which kind it is, so none can slip into a fingerprint undeclared
    assert INPUT_OPTIONS | RUN_ONLY_OPTIONS == {f.name for f in fields(StageOptions)} - {"force"}
    assert "on_progress" in RUN_ONLY_OPTIONS and {"backend", "previous_eval"} <= INPUT_OPTIONS
    assert STAGES["train"].run_only == ("on_progress",) and "on_progress" not in STAGES["train"].takes
    with pytest.raises(ValueError, match=r"unknown input options \['on_progress'\]"):
        Stage("x", (), (), "x", dict, run_function=print, takes=("on_progress",))
    with pytest.raises(ValueError, match=r"unknown run-only options \['backend'\]"):
        Stage("x", (), (), "x", dict, run_function=print, run_only=("backend",))

    calls = []

    def run_x(recipe, workdir, force=False, backend="refit", on_progress=None):
        calls.append((backend, on_progress))
        return {}

    stage = Stage("x", (), (), "x", dict, run_x, takes=("backend",), run_only=("on_progress",))
    watch = StageOptions(backend="lm-eval", on_progress=print)
    fingerprint = stage.input_fingerprint(None, tmp_path, watch)
    assert fingerprint == stage.input_fingerprint(None, tmp_path, StageOptions(backend="lm-eval"))  # no callback
    assert fingerprint != stage.input_fingerprint(None, tmp_path, StageOptions(backend="refit"))  # the input option
    stage.run(None, tmp_path, watch)
    assert calls == [("lm-eval", print)]


def test_a_report_that_does_not_match_its_stage_type_is_refused(tmp_path):
    from pydantic import ValidationError

    from refit.stages.core.contract import Stage
    from refit.stages.publish.stage import PublishReport

    good = {"stage": "x", "version": "v0001", "path": "/r/v0001", "already_published": False, "identity": "i"}
    for report, wrong in [({**good, "surplus": 1}, "surplus"), ({**good, "version": None}, "version")]:
        stage = Stage("x", (), (), "x", PublishReport, lambda recipe, workdir, force, r=report: r)
        with pytest.raises(ValidationError, match=wrong):
            stage.run(None, tmp_path)
    stage = Stage("x", (), (), "x", PublishReport, lambda recipe, workdir, force: good)
    assert stage.run(None, tmp_path) == good and stage.summary(good) == good


def test_code_version_covers_exactly_the_modules_a_stage_imports():
    closure = {name: set(project_modules(f"refit.stages.{name}.stage")) for name in NAMES}
    report_module = "refit.stages.audit.report"
    assert [name for name in NAMES if report_module in closure[name]] == ["audit", "publish"]
    assert "refit.stages.train.loop" in closure["train"]  # started as `-m`: named in the launch command
    assert "refit.stages.pipeline" not in set().union(*closure.values())
    assert all(not module.startswith("refit.flows") for module in set().union(*closure.values()))
    assert "refit.stages.curate.stage" in closure["tokenize"] and "refit.stages.tokenize.stage" not in closure["curate"]


def _complete(folder: Path, content: str) -> None:
    (folder / "data.txt").write_text(content)
    write_marker(folder, "x", "fp-" + content, 0.0, "code")


def test_a_failed_build_leaves_the_previous_output_and_no_staging_folder(tmp_path):
    final = tmp_path / "out"
    with staged_output(final) as out:
        _complete(out, "first")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(final) as out:
            (out / "data.txt").write_text("half")
            raise RuntimeError("boom")
    assert (final / "data.txt").read_text() == "first" and read_marker(final)["fingerprint"] == "fp-first"
    assert not (tmp_path / "out.tmp").exists()
    with pytest.raises(RuntimeError, match="no _SUCCESS.json"):  # a stage that forgot its marker
        with staged_output(final) as out:
            (out / "data.txt").write_text("unmarked")
    assert (final / "data.txt").read_text() == "first"


def test_a_resumable_build_keeps_its_staging_folder_for_the_rerun(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_output(final, reuse=lambda _: True) as out:
            (out / "part-1").write_text("done")
            raise KeyboardInterrupt
    with staged_output(final, reuse=lambda folder: (folder / "part-1").exists()) as out:
        assert (out / "part-1").read_text() == "done"  # resumed, not redone
        _complete(out, "resumed")
    with staged_output(final, reuse=lambda _: False) as out:  # another run's parts are never reused
        assert not (out / "part-1").exists()
        _complete(out, "fresh")
    assert (final / "data.txt").read_text() == "fresh"


@pytest.mark.parametrize("killed_after", ["marker", "first rename"])
def test_recover_finishes_a_swap_killed_with_a_complete_staged_output(tmp_path, killed_after):
    final, tmp, old = tmp_path / "out", tmp_path / "out.tmp", tmp_path / "out.old"
    final.mkdir()
    _complete(final, "previous")
    tmp.mkdir()
    _complete(tmp, "new")
    if killed_after == "first rename":
        final.rename(old)
    recover(final)
    assert (final / "data.txt").read_text() == "new" and not tmp.exists() and not old.exists()


def test_recover_brings_the_previous_output_back_when_the_staged_one_is_incomplete(tmp_path):
    final, tmp, old = tmp_path / "out", tmp_path / "out.tmp", tmp_path / "out.old"
    old.mkdir()
    _complete(old, "previous")
    tmp.mkdir()
    (tmp / "data.txt").write_text("half")  # no marker: not complete
    recover(final)
    assert (final / "data.txt").read_text() == "previous" and not old.exists()
    assert (final / MARKER).is_file()
