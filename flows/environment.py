"""Whether this Python environment holds the versions `requirements.lock` pins.

The lock (written by `make lock`) is what `make demo`, `make test` and CI install; a package
upgraded or downgraded by hand since then runs code nobody tested with Refit. People who
install Refit into an environment of their own use pyproject.toml's ranges and have no lock
beside the package, so there is nothing to compare and nothing is said.
"""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"


def locked_versions(lock: Path) -> dict[str, str]:
    """Package name (canonical) -> pinned version, for the lock's `name==version` lines that
    apply to this interpreter (lines with an environment marker that does not hold are left out)."""
    pins = {}
    for line in lock.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text or text.startswith("-"):
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise ValueError(f"{lock}: cannot read {text!r}: {error}") from None
        pinned = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if pinned and (requirement.marker is None or requirement.marker.evaluate()):
            pins[canonicalize_name(requirement.name)] = pinned[0]
    return pins


def drift(lock: Path | None = None) -> list[str]:
    """One line per locked package installed at another version or not at all; [] when the
    environment matches the lock (the repository's, unless given) or there is no lock."""
    return list(_drift(lock or LOCK))


@functools.cache  # what is installed does not change under a running process: read it once
def _drift(lock: Path) -> tuple[str, ...]:
    if not lock.is_file():
        return ()
    installed = {}
    for distribution in metadata.distributions():  # the first on sys.path wins, as for imports
        installed.setdefault(canonicalize_name(distribution.metadata["Name"] or ""), distribution.version)
    differences = []
    for name, pinned in sorted(locked_versions(lock).items()):
        if name not in installed:
            differences.append(f"{name}: locked {pinned}, not installed")
        elif installed[name] != pinned:
            differences.append(f"{name}: locked {pinned}, installed {installed[name]}")
    return tuple(differences)


def drift_warning(lock: Path | None = None) -> str | None:
    """The warning `refit` prints at start when the environment has drifted from the lock."""
    lock = lock or LOCK
    differences = drift(lock)
    if not differences:
        return None
    shown = "; ".join(differences[:10]) + (f"; and {len(differences) - 10} more" if len(differences) > 10 else "")
    return (
        f"warning: this environment differs from {lock.name} ({shown}): Refit was tested with the locked "
        f"versions; run `make install` to restore them, or `make lock` and `make test` to move the lock"
    )
