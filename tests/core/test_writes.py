"""Atomic writes: a write that fails midway leaves the previous file whole, and the new file
and its rename reach the disk (fsync of the file, then of its folder)."""

from __future__ import annotations

import os

import pytest

from refit.stages.core.markers import write_json_atomic, write_text_atomic


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_text_atomic(path, '{"step": 0}\n')
    with pytest.raises(UnicodeEncodeError):  # fails after the first lines are written
        write_text_atomic(path, '{"step": 1}\n' * 1000 + "\ud800")
    assert path.read_text() == '{"step": 0}\n'


def test_the_file_is_synced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "report.json").exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_json_atomic(tmp_path / "report.json", {"passed": True})
    assert synced == [(str(tmp_path / "report.json.tmp"), False), (str(tmp_path), True)]
