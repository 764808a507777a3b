"""A base checkpoint that needs its own Python code, refused with the recipe field to change."""

from __future__ import annotations

from pathlib import Path


class RemoteCodeRefused(RuntimeError):
    """The checkpoint needs its own code to load and the recipe does not allow running it."""


def check_loadable_config(path: Path, trust_remote_code: bool) -> None:
    """Load the checkpoint's config as the stages will; transformers' refusal to run the
    checkpoint's code (a multi-line ValueError) becomes one RemoteCodeRefused line."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise RemoteCodeRefused(
            f"{path} needs its own Python code to load (its config.json maps to custom classes), and "
            f"base_model.trust_remote_code is false: set it to true in the recipe if you trust that code"
        ) from None
