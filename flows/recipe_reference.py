"""docs/recipe.md, the recipe reference, written from the recipe's own classes: every field with
its type, default and docstring. `make docs` rewrites it; tests/test_docs.py fails when it is
stale, so the reference cannot drift from the code.

    python -m refit.flows.recipe_reference > docs/recipe.md
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from refit.stages.core.config import Recipe, sections_in, unfingerprinted

HEADER = """# Recipe reference

One YAML file is one complete run. Every section and field is listed here with its type, its
default and what it does; a field without a default is required. Relative paths are relative
to the recipe file. `refit validate RECIPE` checks a recipe and lists every problem at once;
`refit init` writes a complete, commented one from a template.

A field marked *execution only* says where or how a stage runs, never what it makes: changing
it reruns nothing. One marked *fingerprinted by content* names input files whose content, not
location, decides what reruns. *Read by the flows only*: no stage reads it (see
[Fingerprints](design.md#fingerprints)).

This page is generated from the field docstrings in `stages/core/config.py` by `make docs`
(`python -m refit.flows.recipe_reference`); edit those, not this file.
"""


def _type(annotation: Any) -> str:
    """The annotation as a reader writes it in YAML terms: `int`, `list[str]`, `"a" | "b"`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(its defaults)"
    return f"`{value!r}`" if value not in (None, "") else f"`{'null' if value is None else repr(value)}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _description(field: FieldInfo) -> str:
    """The field's docstring, after its mark when its value enters no fingerprint."""
    mark = unfingerprinted(field)
    return _cell(f"*{mark.capitalize()}.* {field.description}" if mark else field.description)


def render() -> str:
    """The whole reference: the top-level fields, then each section once, where it is first met."""
    lines, seen, todo = [HEADER], set(), [(Recipe, "")]
    while todo:
        model, path = todo.pop(0)
        if model in seen:
            continue
        seen.add(model)
        lines += [
            f'<a id="{model.__name__.lower()}"></a>',
            f"## `{path}` ({model.__name__})" if path else "## Top level",
        ]
        if model.__doc__ and model is not Recipe and model.__doc__ != BaseModel.__doc__:
            lines += ["", _cell(model.__doc__)]
        lines += ["", "| field | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_description(field)} |")
            many = typing.get_origin(field.annotation) is list
            todo += [(m, f"{path}.{name}".lstrip(".") + "[]" * many) for m in sections_in(field.annotation)]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
