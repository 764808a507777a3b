"""Names from a recipe that become folder names: the result must stay inside its folder.

The recipe already rejects `.`, `..` and separators in names; this is the second line of
defence where a name is joined to a path, for local paths and fsspec paths alike.
"""

from __future__ import annotations

import posixpath
from pathlib import Path


class PathEscape(ValueError):
    """A name would place an output outside the folder it belongs in."""


def inside(folder: str | Path, *names: str) -> str | Path:
    """`folder/names...`, refused unless it lies strictly below folder (checked lexically,
    so it works for fsspec paths too); returns the type it was given."""
    root = posixpath.normpath(str(folder))
    joined = posixpath.normpath(posixpath.join(root, *names))
    if not names or not joined.startswith(root.rstrip("/") + "/"):
        raise PathEscape(f"{'/'.join(names)!r} would leave {folder}: a name must not be '.', '..' or a path")
    return Path(joined) if isinstance(folder, Path) else joined
