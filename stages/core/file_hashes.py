"""sha256 of large files (model weights), read once per file version.

A file's digest is remembered in a memo folder under its resolved path, with the size and
modification time (ns) it had when it was read; it is read again only when either changed,
as `make` and `rsync` decide. Each path has a memo file of its own, written atomically, so
concurrent runs sharing the folder (sweep variants) never lose each other's entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from refit.stages.core.markers import file_sha256, replaced_atomically


def memoized_sha256(path: Path, memo_dir: Path) -> str:
    """The sha256 of path, from memo_dir when the file's size and mtime are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    version = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = Path(memo_dir) / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        entry = json.loads(memo.read_text())
        if {k: entry.get(k) for k in version} == version:
            return entry["sha256"]
    except (OSError, ValueError, KeyError):
        pass  # no memo yet, or an unreadable one: hash the file
    digest = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(memo, tmp_suffix=f".{os.getpid()}.tmp") as handle:  # runs share the folder
            handle.write(json.dumps({**version, "sha256": digest}))
    except OSError:  # a full disk: without the memo the file is only read again next time
        pass
    return digest


def directory_sha256(folders: list[Path], memo_dir: Path) -> str:
    """One digest of every regular file directly in the given folders (a checkpoint and its
    tokenizer): names and contents, so renaming or changing any file changes it."""
    digest = hashlib.sha256()
    for folder in dict.fromkeys(Path(f).resolve() for f in folders):  # the tokenizer is often the model's folder
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(f"{path.name}\0{memoized_sha256(path, memo_dir)}\n".encode())
    return digest.hexdigest()
