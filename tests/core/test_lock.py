"""One run per workdir: a second one stops with the holder named, or waits; a killed holder
never leaves the lock behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, hold_lock

from refit.stages.core.lock import LOCK_FILE, WorkdirBusy, workdir_lock


def test_a_second_run_stops_naming_the_holder_and_a_killed_holder_frees_the_workdir(tmp_path):
    holder = hold_lock(tmp_path)
    with pytest.raises(WorkdirBusy, match=rf"in use by refit run demo \(pid {holder.pid} .*--wait"):
        with workdir_lock(tmp_path, "refit stage train"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir_lock(tmp_path, "refit stage train"):  # the kernel released it
        assert "refit stage train" in (tmp_path / LOCK_FILE).read_text()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_forked_workers_of_a_killed_run_do_not_keep_the_lock(tmp_path):
    code = (
        "import os, sys, time; from refit.stages.core.lock import workdir_lock\n"
        "with workdir_lock(sys.argv[1], 'refit stage curate'):\n"
        "    worker = os.fork()\n"  # a pool worker that outlives its killed parent
        "    if worker == 0:\n        os.write(1, b'forked\\n')\n        time.sleep(600)\n        os._exit(0)\n"
        "    os.write(1, f'held {worker}\\n'.encode()); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    # once the worker writes, its at-fork hook has closed its copy of the lock (under load that can
    # come after the holder's line: a rerun started in between would find the workdir busy); one
    # write() each, so that the two lines never interleave
    lines = sorted(holder.stdout.readline().split() for _ in range(2))
    assert lines[0] == ["forked"] and lines[1][0] == "held"
    worker = lines[1][1]
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with workdir_lock(tmp_path, "the rerun"):
            pass
    finally:
        os.kill(int(worker), signal.SIGKILL)


def test_wait_queues_behind_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    threading.Timer(1.0, holder.terminate).start()
    started = time.time()
    with workdir_lock(tmp_path, "second", wait=True, poll=0.1):
        assert holder.poll() is not None and time.time() - started >= 0.9


def test_the_busy_message_names_the_live_child_when_the_holder_died(tmp_path):
    code = (
        "import subprocess, sys, time\n"
        "from refit.stages.core.lock import held_locks, record_lock_holder, workdir_lock\n"
        "with workdir_lock(sys.argv[1], 'refit run demo'):\n"  # a child keeps the lock, as the training launcher does
        "    child = subprocess.Popen(['sleep', '600'], pass_fds=held_locks())\n"
        "    record_lock_holder(child.pid)\n"
        "    print(child.pid, flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with pytest.raises(WorkdirBusy, match=rf"refit run demo \(pid {child}, started by pid {holder.pid}, which has"):
            with workdir_lock(tmp_path, "the rerun"):
                pass
    finally:
        os.kill(child, signal.SIGKILL)
    with workdir_lock(tmp_path, "the rerun", wait=True, poll=0.05):  # the child's death releases it
        pass


def test_the_busy_message_says_the_holder_is_unknown_when_the_lock_file_does_not_name_it(tmp_path):
    holder = hold_lock(tmp_path)
    lock_file = tmp_path / LOCK_FILE
    try:
        for text, why in (("", "is empty"), ("garbage", "holds no holder record"), ("[]", "holds no holder record")):
            lock_file.write_text(text)  # as a holder that has not written its record yet, or not refit's
            with pytest.raises(
                WorkdirBusy, match=rf"in use by another run \(holder unknown: {re.escape(str(lock_file))} {why}\);"
            ):
                with workdir_lock(tmp_path, "the rerun"):
                    pass
    finally:
        holder.kill()
        holder.wait()
