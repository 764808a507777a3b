"""Heartbeats between the training processes: a process that dies or hangs is named, and the
others stop within a bounded time.

Each process beats from a thread into `train/heartbeats/rank-N.json` (host, pid, step, a beat
counter) every second, and reads everyone else's. A process whose counter has not moved for
`train.heartbeat_timeout` seconds of the reader's own clock (no clock is compared across
machines) is declared dead: the reader records why, naming it, and exits, which makes its
launcher stop the processes of its machine. Without this, the processes of one machine that
lose a peer on another wait in a collective until its timeout (30 minutes by default).
The workdir is shared by every machine of a run, so the heartbeats need no extra service.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

FOLDER = "heartbeats"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


class Heartbeat:
    """Beat for `rank` and watch ranks 0..world-1; `on_dead(reason)` is called from the watching
    thread (once) when another rank falls silent. Set `step` as training advances; `finish()`
    tells the others this rank ended normally, so they do not wait for its beats."""

    def __init__(
        self,
        train_dir: Path,
        rank: int,
        world: int,
        timeout: float,
        on_dead: Callable[[str], None],
        every: float = 1.0,
    ):
        self.folder = Path(train_dir) / FOLDER
        self.rank, self.world, self.timeout, self.on_dead, self.every = rank, world, timeout, on_dead, every
        self.step = 0
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refit-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()
        self._beat(finished=True)

    def _beat(self, finished: bool = False) -> None:
        self._count += 1
        path = self.folder / f"rank-{self.rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        record = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self.step,
            "beat": self._count,
            "finished": finished,
        }
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:  # a full disk: a missed beat matters only after the timeout; training itself says why
            tmp.unlink(missing_ok=True)

    def _reason(self, rank: int, record: dict | None) -> str:
        where = f" (pid {record['pid']} on {record['host']}, last at step {record['step']})" if record else ""
        return (
            f"training process rank {rank}{where} sent no heartbeat for {self.timeout:.0f} s: it died or hung, "
            f"so rank {self.rank} stopped too"
        )

    def _run(self) -> None:
        started = time.monotonic()
        last_seen: dict[int, tuple[object, float]] = {}  # rank -> (its last beat, when that changed)
        self._beat()
        while not self._stop.wait(self.every):
            self._beat()
            now = time.monotonic()
            for rank in range(self.world):
                record = _read(self.folder / f"rank-{rank}.json") if rank != self.rank else None
                if rank == self.rank or (record and record.get("finished")):
                    continue
                beat = record and (record.get("pid"), record.get("beat"))  # a new process restarts the count
                if rank not in last_seen or beat != last_seen[rank][0]:
                    last_seen[rank] = (beat, now if beat else started)
                elif now - last_seen[rank][1] > self.timeout:
                    self.on_dead(self._reason(rank, record))
                    return
