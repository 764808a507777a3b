"""Done markers, fingerprints and atomic output folders shared by every stage.

A stage writes into `<dir>.tmp/`, then swaps it into place and writes `_SUCCESS.json`
last. A stage is done iff the marker exists and names the same input fingerprint, so a
half-written output is never visible and never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

MARKER = "_SUCCESS.json"
_CODE_DIR = Path(__file__).resolve().parent


def code_version() -> str:
    """Hash of the stage sources: a code change invalidates every cached output."""
    digest = hashlib.sha256()
    for path in sorted(_CODE_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(stage: str, section: Any, upstream: list[str] | tuple[str, ...] = ()) -> str:
    """Input fingerprint: the stage's recipe section, its upstream fingerprints, the code."""
    payload = json.dumps(
        {"stage": stage, "section": section, "upstream": list(upstream), "code": code_version()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_marker(directory: Path) -> dict | None:
    path = Path(directory) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(directory: Path, input_fingerprint: str) -> bool:
    marker = read_marker(directory)
    return marker is not None and marker.get("fingerprint") == input_fingerprint


STAGES = ("curate", "tokenize", "mix", "train", "evaluate", "audit", "publish")  # pipeline order
STAGE_DIRS = {"evaluate": "eval"}  # output folders named otherwise than their stage (DESIGN.md §3)


def stage_dir(workdir: Path, stage: str) -> Path:
    return Path(workdir) / STAGE_DIRS.get(stage, stage)


def upstream_fingerprint(workdir: Path, stage: str, needed_by: str) -> str:
    """What a finished upstream stage was made from and what it produced (sha256 of each output),
    or a clear error if it has not run. A rerun that produced other bytes (a forced,
    nondeterministic retraining) thus makes every later stage run again."""
    marker = read_marker(stage_dir(workdir, stage))
    if marker is None:
        raise StageNotReady(
            f"{needed_by} needs the {stage} stage's output in {workdir}: run `refit stage {stage}` first"
        )
    return hashlib.sha256(json.dumps([marker["fingerprint"], marker["outputs"]], sort_keys=True).encode()).hexdigest()


class StageNotReady(RuntimeError):
    """A stage was asked to run before the stage it reads from."""


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_marker(
    directory: Path,
    stage: str,
    input_fingerprint: str,
    started: float,
    extra: dict | None = None,
    known_sha256: dict[str, str] | None = None,
) -> dict:
    """Record what was produced (sha256 of every output file) and when; written last.
    known_sha256 (relative path -> digest) spares re-reading files the stage already hashed."""
    directory = Path(directory)
    known = known_sha256 or {}
    outputs = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MARKER:
            name = str(path.relative_to(directory))
            outputs[name] = known.get(name) or file_sha256(path)
    marker = {
        "stage": stage,
        "fingerprint": input_fingerprint,
        "code_version": code_version(),
        "started": started,
        "finished": time.time(),
        "seconds": round(time.time() - started, 3),
        "outputs": outputs,
        **(extra or {}),
    }
    write_json_atomic(directory / MARKER, marker)
    return marker


def _link_or_copy(source: str, target: str) -> None:
    """Immutable outputs are hard-linked; databases, which are changed in place, are copied."""
    (shutil.copy2 if source.endswith(".sqlite") else os.link)(source, target)


def staging_dir(final: Path, copy_previous: bool = False) -> Path:
    """A fresh `<final>.tmp/`; with copy_previous, seeded with the current output (hard links
    for files never modified in place, copies of *.sqlite), so the previous output survives."""
    final = Path(final)
    recover(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if copy_previous and final.is_dir():
        shutil.copytree(final, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MARKER))
    else:
        tmp.mkdir(parents=True)
    return tmp


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace final by tmp: two renames, recoverable by `recover` if killed between them."""
    final, old = Path(final), Path(final).with_name(Path(final).name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    Path(tmp).rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """Undo a swap killed between its renames: the previous output comes back."""
    final, old = Path(final), Path(final).with_name(Path(final).name + ".old")
    if old.exists() and not final.exists():
        old.rename(final)
    shutil.rmtree(old, ignore_errors=True)
