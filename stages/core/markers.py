"""Done markers, fingerprints and the one atomic-output rule of every stage (code versions:
`code_version`).

The rule: a stage builds its output in `<folder>.tmp/`, writes `_SUCCESS.json` there last,
then swaps the folder into place (two renames). A stage is done iff the marker exists,
names the same input fingerprint and every output it lists is still there at its size, so a
half-written or damaged output is never visible and never reused, and the previous good
output is only replaced once the new one is complete. A run killed anywhere in between is
put right by `recover` at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

MARKER = "_SUCCESS.json"


def fingerprint(stage: str, inputs: Any, upstream: list[str] | tuple[str, ...], code: str) -> str:
    """Input fingerprint: what the stage reads of the recipe and besides it (`inputs`), what the
    stages before it produced (their `output_fingerprint`s) and its code version."""
    payload = json.dumps(
        {"stage": stage, "inputs": inputs, "upstream": list(upstream), "code": code}, sort_keys=True, default=str
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


def damaged_outputs(directory: Path, marker: dict) -> dict[str, str]:
    """The outputs a done marker lists that are gone or no longer of the size they were written
    with (a truncated or half-copied file): name -> what is wrong. Sizes cost a stat per file,
    so every use of a finished output checks them; content hashes are checked where reading
    the bytes is cheap beside the work that reads them (the shards, before training)."""
    sizes = marker.get("sizes", {})  # absent from markers written before sizes were recorded
    damaged = {}
    for name in marker.get("outputs", {}):
        try:
            size = (Path(directory) / name).stat().st_size
        except OSError:
            damaged[name] = "is missing"
            continue
        if name in sizes and size != sizes[name]:
            damaged[name] = f"has {size} bytes, {sizes[name]} when written"
    return damaged


def is_done(directory: Path, input_fingerprint: str) -> bool:
    """The output is complete for this fingerprint and undamaged (else the stage runs again)."""
    marker = read_marker(directory)
    return (
        marker is not None and marker.get("fingerprint") == input_fingerprint and not damaged_outputs(directory, marker)
    )


def output_fingerprint(folder: Path, stage: str, needed_by: str) -> str:
    """What a finished stage was made from and what it produced (sha256 of each output), or
    a clear error if it has not run or its output is damaged. A rerun that produced other
    bytes (a forced, nondeterministic retraining) thus makes every later stage run again."""
    marker = read_marker(folder)
    if marker is None:
        raise StageNotReady(
            f"{needed_by} needs the {stage} stage's output in {Path(folder).parent}: run `refit stage {stage}` first"
        )
    if damaged := damaged_outputs(folder, marker):
        raise DamagedOutput(folder, stage, damaged)
    return hashlib.sha256(json.dumps([marker["fingerprint"], marker["outputs"]], sort_keys=True).encode()).hexdigest()


class StageNotReady(RuntimeError):
    """A stage was asked to run before the stage it reads from."""


class DamagedOutput(StageNotReady):
    """A finished stage's output changed on disk after its writer recorded it."""

    def __init__(self, folder: Path, stage: str, damaged: dict[str, str]):
        name, wrong = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        super().__init__(
            f"the {stage} stage's output in {folder} is damaged: {name} {wrong}{more}; rerun that stage with "
            f"`refit run RECIPE --force {stage}` (or `refit stage {stage} RECIPE --force`)"
        )


@contextmanager
def replaced_atomically(path: Path, mode: str = "w", tmp_suffix: str = ".tmp") -> Iterator[IO]:
    """A handle whose content replaces path when the block ends without error, so that a crash,
    even of the machine, leaves the old file or the new one, never a torn or empty one: it is
    written to a temporary file beside path (removed if the block fails, a full disk say), that
    is fsynced and renamed over path, then the folder is fsynced so the rename is on disk too.
    tmp_suffix: unique per writer where several may write the same path at once."""
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace path with text atomically (see `replaced_atomically`)."""
    with replaced_atomically(path) as handle:
        handle.write(text)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_marker(
    directory: Path,
    stage: str,
    input_fingerprint: str,
    started: float,
    code: str,
    extra: dict | None = None,
    known_sha256: dict[str, str] | None = None,
) -> dict:
    """Record what was produced (sha256 of every output file) and when; written last.
    known_sha256 (relative path -> digest) spares re-reading files the stage already hashed."""
    directory = Path(directory)
    known = known_sha256 or {}
    outputs, sizes = {}, {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MARKER:
            name = str(path.relative_to(directory))
            outputs[name] = known.get(name) or file_sha256(path)
            sizes[name] = path.stat().st_size
    marker = {
        "stage": stage,
        "fingerprint": input_fingerprint,
        "code_version": code,
        "started": started,
        "finished": time.time(),
        "seconds": round(time.time() - started, 3),
        "outputs": outputs,
        "sizes": sizes,  # not in the output fingerprint: what `damaged_outputs` compares
        **(extra or {}),
    }
    write_json_atomic(directory / MARKER, marker)
    return marker


def _link_or_copy(source: str, target: str) -> None:
    """Immutable outputs are hard-linked; databases, which are changed in place, are copied."""
    (shutil.copy2 if source.endswith(".sqlite") else os.link)(source, target)


def _partner(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


@contextmanager
def staged_output(
    final: Path, seed_previous: bool = False, reuse: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Build a stage's output in `<final>.tmp/` and swap it into place when the block ends
    without error; the block writes the done marker last. The previous output stays as it
    was until then. seed_previous: start from hard links to the previous output (an
    incremental run). reuse: keep a staging folder left by a killed run when reuse(folder)
    says its parts are this run's (tokenize's finished shards, train's checkpoints); such a
    folder is also kept when the block fails, for the rerun to resume from."""
    final = Path(final)
    recover(final)
    tmp = _partner(final, ".tmp")
    resumable = reuse is not None
    if not (resumable and tmp.is_dir() and reuse(tmp)):
        shutil.rmtree(tmp, ignore_errors=True)
        if seed_previous and final.is_dir():  # never a file damaged since it was written: it is made again
            damaged = {final / name for name in damaged_outputs(final, read_marker(final) or {})}
            shutil.copytree(
                final,
                tmp,
                copy_function=_link_or_copy,
                ignore=lambda folder, names: [n for n in names if n == MARKER or Path(folder) / n in damaged],
            )
        else:
            tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if read_marker(tmp) is None:
        raise RuntimeError(f"{tmp} has no {MARKER}: a stage must write its marker before its output is swapped in")
    swap_into_place(tmp, final)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace final by the complete tmp: two renames; `recover` finishes them if killed between."""
    final = Path(final)
    old = _partner(final, ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    Path(tmp).rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """Put right a swap killed midway: a complete staged output (marker written) goes into
    place; otherwise the previous output comes back. Nothing complete is ever lost."""
    final = Path(final)
    old, tmp = _partner(final, ".old"), _partner(final, ".tmp")
    if read_marker(tmp) is not None:
        if final.exists() and not old.exists():
            final.rename(old)
        if not final.exists():
            tmp.rename(final)
    if old.exists() and not final.exists():
        old.rename(final)
    shutil.rmtree(old, ignore_errors=True)
