"""A checkpoint's own Python code: a base that needs it, refused with the recipe field to change,
and references to code a folder does not hold, which no exported or published model keeps."""

from __future__ import annotations

import json
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


# The files in which Hugging Face maps Auto classes to a checkpoint's own Python modules.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _code_is_in(folder: Path, reference: str) -> bool:
    """Whether `modeling_x.XForCausalLM`'s module `modeling_x.py` is in folder; a
    `repo--module.Class` reference names code kept in another repository, never in folder."""
    return "--" not in reference and (folder / (reference.rsplit(".", 1)[0].replace(".", "/") + ".py")).is_file()


def foreign_code_references(folder: Path) -> dict[str, list[str]]:
    """Per file of `folder`, the auto_map entries naming code that is not in `folder`: whoever
    loads the model with trust_remote_code=True would run whatever sits beside it under that name."""
    found = {}
    for name in AUTO_MAP_FILES:
        path = Path(folder) / name
        auto_map = json.loads(path.read_text()).get("auto_map") if path.is_file() else None
        if not isinstance(auto_map, dict):
            continue
        missing = []
        for key, references in auto_map.items():
            for reference in references if isinstance(references, list) else [references]:
                if isinstance(reference, str) and not _code_is_in(Path(folder), reference):
                    missing.append(f"{key}: {reference}")
        if missing:
            found[name] = missing
    return found


def drop_foreign_code_references(folder: Path) -> dict[str, list[str]]:
    """Remove the auto_map of every file whose map names code that `folder` does not hold (the
    model was loaded with a built-in class, so that code never ran); returns what was removed."""
    found = foreign_code_references(folder)
    for name in found:
        path = Path(folder) / name
        settings = json.loads(path.read_text())
        del settings["auto_map"]
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return found
