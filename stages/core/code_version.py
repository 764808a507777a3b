"""Code versions: a hash of what the project code a stage runs does, so that a change of code
reruns the stages it can affect and no other, and rewording a comment or docstring reruns nothing.

A stage runs the project modules its module imports, directly or through others (see
`project_modules`). Every stage imports the recipe's module for its types, and that module holds
every section's class: it counts only for what the stage declares it reads (see `_recipe_code`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

PROJECT = "refit"  # the import namespace whose modules make up a stage's code version
RECIPE_MODULE = f"{PROJECT}.stages.core.config"
RECIPE, SECTION = "Recipe", "Section"  # in the recipe's module: the recipe's class and its sections' base


def _module_file(name: str) -> Path | None:
    """The source file of module `name`, found without importing it (only its parents), the
    same under an editable install (whose finder maps the packages) as from a plain folder."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a name imported from a module, not a module
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _imported_names(source: str) -> Iterator[str]:
    """Every absolute module name `source` may run: its import statements at any depth
    (imports inside functions count: they run when the stage does) and string constants that
    name a project module (one started with `python -m`, like the training worker). A name
    imported from a module comes as `module.name`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PROJECT + "."):
            yield node.value


@functools.cache
def project_modules(module: str) -> dict[str, Path]:
    """The project modules `module` imports, directly or through others, with their package
    `__init__` files: its import graph within the `refit` namespace."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found or (path := _module_file(name)) is None:
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # the packages it lives in
        todo += [n for n in _imported_names(path.read_text()) if n.split(".")[0] == PROJECT]
    return found


def _meaning(source: str) -> ast.Module:
    """A module as Python runs it: its syntax tree without comments (the parser drops them),
    or string statements (docstrings, and the field docstrings pydantic turns into
    descriptions, which only the documentation reads). Line numbers are left out when dumped."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list) and statements and isinstance(statements[0], ast.stmt):
                kept = [
                    s
                    for s in statements
                    if not (
                        isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)
                    )
                ]
                setattr(node, field, kept or [ast.Pass()])
    return tree


@functools.cache
def code_version(module: str, declared: tuple[str, ...] = ()) -> str:
    """Hash of what the project modules `module` imports do, the recipe's module counting only
    for the recipe paths `declared` (see `_recipe_code`): editing a stage's code reruns that stage
    and those that read its output, not the others; rewording a comment or docstring reruns nothing."""
    modules = project_modules(module)
    digest = hashlib.sha256()
    for name, path in sorted(modules.items()):
        tree = _meaning(path.read_text())
        if name == RECIPE_MODULE:
            prefix = RECIPE_MODULE + "."
            imported = {
                found[len(prefix) :]
                for other in modules.values()
                for found in _imported_names(other.read_text())
                if found.startswith(prefix)
            }
            tree = ast.Module(body=_recipe_code(tree, declared, imported), type_ignores=[])
        digest.update(name.encode() + b"\0" + ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _defined(node: ast.stmt) -> list[str]:
    """The module-level names a statement defines."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [target.id for target in targets if isinstance(target, ast.Name)]


def _self_reads(function: ast.FunctionDef) -> set[str]:
    """The dotted paths `function` reads from `self`: `self.publish.model_name` -> publish.model_name."""
    inner = {id(node.value) for node in ast.walk(function) if isinstance(node, ast.Attribute)}
    reads = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = []
            while isinstance(node, ast.Attribute):
                chain.insert(0, node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id == "self":
                reads.add(".".join(chain))
    return reads


def covers(declared: tuple[str, ...] | set[str], path: str) -> bool:
    """Whether a declared dotted recipe path is `path` or holds it (`train` holds `train.seed`)."""
    return any(path == entry or path.startswith(entry + ".") for entry in declared)


def _recipe_code(tree: ast.Module, declared: tuple[str, ...], imported: set[str]) -> list[ast.stmt]:
    """What a stage runs, or reads values through, of the recipe's module: the `Section` base;
    for each declared path (`train`, `train.seed`, `evaluate.benchmarks.name`), the statements of
    the fields along it and, where it ends at a section, that section's class and the classes of
    the sections it holds; the recipe's properties that read only what it declares (`peak_lr`,
    for schedule.max_lr); the functions and constants it imports from the module (`dump_recipe`),
    with what they name there. Not the rest, which parses, fills in and checks a recipe: what it
    does shows in the resolved values the fingerprint holds, or rejects the recipe."""
    top = {name: node for node in tree.body for name in _defined(node)}
    classes = {name: node for name, node in top.items() if isinstance(node, ast.ClassDef)}
    sections = {SECTION}
    for node in classes.values():  # in file order: a base comes before the classes built on it
        if {getattr(base, "id", None) for base in node.bases} & sections:
            sections.add(node.name)
    parts = {SECTION: classes[SECTION]}
    for path in declared:
        section = RECIPE
        for name in path.split("."):
            statement = next(s for s in classes[section].body if isinstance(s, ast.AnnAssign) and s.target.id == name)
            parts[f"{section}.{name}"] = statement
            section = next(iter(sorted(_names(statement.annotation) & sections)), None)  # None: a value
        held = [section] if section else []
        while held:  # the section's class and the classes of the sections it holds, at any depth
            name = held.pop()
            if name not in parts:
                parts[name] = classes[name]
                held += sorted(_names(classes[name]) & sections - {name, RECIPE})
    for node in classes[RECIPE].body:
        decorators = {getattr(d, "id", None) for d in getattr(node, "decorator_list", [])}
        if "property" in decorators and all(covers(declared, read) for read in _self_reads(node)):
            parts[f"{RECIPE}.{node.name}"] = node
    todo = sorted(imported & top.keys() - sections)
    while todo:  # the imported functions and constants, and what they name in the module
        name = todo.pop()
        if name not in parts:
            parts[name] = top[name]
            todo += sorted(_names(top[name]) & top.keys() - sections)
    return [parts[key] for key in sorted(parts)]
