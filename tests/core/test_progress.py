"""Progress lines with an ETA, and a training run whose output has them instead of the Hugging
Face libraries' per-checkpoint bars."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import prepare, scoring_tasks

from refit.stages.core.config import load_recipe
from refit.stages.core.progress import Progress, eta
from refit.stages.train import stage as train

LINE = re.compile(r"train: \[#* *\] (\d+)/(\d+) steps \(\d+%\) loss \d+\.\d+ lr \S+ phase \w+, ETA (\d+:\d\d:\d\d|\?)")


def test_eta_is_the_remaining_work_at_the_pace_so_far():
    assert eta(40, 100, 60.0) == "0:01:30"
    assert eta(0, 100, 5.0) == "?"
    assert eta(100, 100, 60.0) == "0:00:00"


def test_the_first_update_only_sets_the_pace_and_later_ones_log_at_most_every_interval(caplog):
    caplog.set_level(logging.INFO)
    progress = Progress("work", 10, "items", logging.getLogger("progress-test"), every=3600)
    progress.update(4)  # e.g. a resumed run: 4 done before this process started
    progress.update(5, "detail")  # within the interval: nothing
    assert caplog.messages == []
    progress.update(10, "detail")  # the last update always logs
    assert caplog.messages == ["work: [####################] 10/10 items (100%) detail, ETA 0:00:00"]


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_training_output_has_progress_lines_with_an_eta_and_no_library_bars(
    tmp_path, tiny_model_dir, capfd, caplog, monkeypatch
):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # the stage must quiet them itself
    monkeypatch.setattr(train, "POLL_SECONDS", 0.1)
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="refit")
    path, workdir = prepare(tmp_path, tiny_model_dir, steps=24)  # a checkpoint every 4 steps
    capfd.readouterr()  # the data stages' output
    train.run_train(load_recipe(path), workdir)
    output = capfd.readouterr()
    captured = output.out + output.err
    assert "Writing model shards" not in captured and "Loading weights" not in captured
    assert "it/s]" not in captured  # no tqdm bar of any kind
    lines = [m for m in map(LINE.fullmatch, caplog.messages) if m]
    assert len(lines) >= 2, caplog.messages
    assert any(m.group(3) != "?" and int(m.group(1)) < 24 for m in lines)  # an ETA while it runs
    assert lines[-1].group(1, 2, 3) == ("24", "24", "0:00:00")


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_scoring_logs_a_progress_line_per_set_and_no_loading_bars(tiny_model_dir, capfd, caplog):
    from transformers.utils import logging as transformers_logging

    from refit.stages.evaluate.scorer import ScoringSettings, score_models

    transformers_logging.enable_progress_bar()  # as in a fresh process: the scorer must turn them off
    caplog.set_level(logging.INFO, logger="refit")
    capfd.readouterr()
    models = {"base": tiny_model_dir, "candidate": tiny_model_dir}
    score_models(models, tiny_model_dir, scoring_tasks(), ScoringSettings("cpu", "float32", batch_size=4))
    assert "Loading weights" not in "".join(capfd.readouterr())
    lines = [m for m in caplog.messages if m.startswith("evaluate: [")]
    assert [re.search(r"\] (\d+/\d+) sets scored", m).group(1) for m in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[-1].endswith("ETA 0:00:00") and "ETA ?" not in lines[1]
