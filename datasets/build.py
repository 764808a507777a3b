"""Regenerate the bundled demo corpora and benchmarks from documentation on this machine.

    python datasets/build.py            # writes datasets/*.jsonl.gz and datasets/benchmarks/*.jsonl

Sources (see datasets/README.md for licenses):
  * legacy: docstrings of the CPython 3.11 standard library (PSF License),
  * new:    the PostgreSQL 15 reference pages installed as man pages (PostgreSQL License),
  * qa:     question/answer pairs derived from the headers and parameter lists of both.

Deterministic: every ordering is sorted and every choice is made by a seeded RNG, so two
runs on the same Python and PostgreSQL versions produce byte-identical files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

from refit.stages.core.text import WORD, word_ngrams  # the definitions decontamination uses

HERE = Path(__file__).resolve().parent

SEED = 20240710
HELD_OUT_PERCENT = 20  # pages/modules reserved for the cloze benchmarks, never in a corpus
MAN_DIRS = [Path("/usr/share/man/man7"), Path("/usr/share/man/man1")]
# Standard-library packages documented in the legacy corpus (pure-Python, importable, stable).
STDLIB_SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "ensurepip",
    "venv",
    "pydoc_data",
    "msilib",
    "nturl2path",
    "_pydecimal",
}
LEGACY_MAX_BYTES = 3_200_000
NGRAM = 13


def bucket(key: str) -> int:
    """A stable 0..99 bucket for a key, independent of PYTHONHASHSEED."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100


def clean(text: str) -> str:
    text = text.replace("\t", "    ")
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ----------------------------------------------------------------------------- legacy


def stdlib_modules() -> list[str]:
    stdlib = Path(os.__file__).parent
    names = set()
    for info in pkgutil.walk_packages([str(stdlib)], onerror=lambda _: None):
        top = info.name.split(".")[0]
        if top.startswith("_") or top in STDLIB_SKIP or "site-packages" in info.name:
            continue
        if any(part.startswith("_") or part.startswith("test") for part in info.name.split(".")):
            continue
        names.add(info.name)
    return sorted(names)


def module_documents(name: str) -> list[dict]:
    """One document per module, class, method and function docstring, titled by its qualified name."""
    try:
        module = importlib.import_module(name)
    except BaseException:  # some modules refuse to import on this platform; skip them
        return []
    docs: list[dict] = []
    if inspect.getdoc(module):
        docs.append({"id": f"py:{name}", "title": name, "text": f"Module {name}\n\n{clean(inspect.getdoc(module))}"})
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        add_object_doc(docs, f"{name}.{attr}", obj)
        if inspect.isclass(obj):
            for method, function in sorted(vars(obj).items()):
                if inspect.isfunction(function) and not method.startswith("_"):
                    add_object_doc(docs, f"{name}.{attr}.{method}", function)
    return docs


def add_object_doc(docs: list[dict], qualname: str, obj: object) -> None:
    doc = obj.__doc__ and inspect.cleandoc(obj.__doc__)  # own docstring only, never inherited
    if not doc or len(doc) < 40:
        return
    try:
        signature = re.sub(r" at 0x[0-9a-f]+", "", str(inspect.signature(obj)))  # no addresses
    except (TypeError, ValueError):
        signature = "(...)"
    kind = "class" if inspect.isclass(obj) else "def"
    docs.append({"id": f"py:{qualname}", "title": qualname, "text": f"{kind} {qualname}{signature}\n\n{clean(doc)}"})


# ----------------------------------------------------------------------------- new


def render_man(path: Path) -> str:
    env = dict(os.environ, MANWIDTH="100", LC_ALL="C.UTF-8")
    out = subprocess.run(["man", "-l", str(path)], env=env, capture_output=True, check=True).stdout
    return subprocess.run(["col", "-b"], input=out, capture_output=True, check=True).stdout.decode("utf-8", "replace")


def postgres_pages() -> list[Path]:
    pages = []
    for directory in MAN_DIRS:
        for path in sorted(directory.glob("*.gz")):
            head = gzip.open(path, "rt", errors="replace").read(600)
            if "PostgreSQL" in head and "Documentation" in head:
                pages.append(path)
    return pages


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Split a rendered man page into (title, [(section, body)]), bodies dedented."""
    lines = text.splitlines()[1:]  # drop the running header
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if re.match(r"^[A-Z][A-Z /-]+$", line):
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line[7:] if line.startswith("       ") else line.strip())
    parsed = [(name, clean("\n".join(body))) for name, body in sections if name != "PostgreSQL 15.18"]
    title = parsed[0][1] if parsed and parsed[0][0] == "NAME" else ""
    return title, [(name, body) for name, body in parsed if body and not body.startswith("PostgreSQL 15")]


def page_documents(path: Path) -> tuple[str, str, list[dict]]:
    """Documents for one page (one per section, NAME line excluded) plus its command and purpose."""
    title, sections = split_sections(render_man(path))
    command, _, purpose = title.partition(" - ")
    if command.isupper():  # man page names of SQL commands use underscores for spaces
        command = command.replace("_", " ")
    stem = path.name.split(".")[0]
    docs = [
        {"id": f"pg:{stem}:{i}", "title": command, "text": f"{command}: {name.title()}\n\n{body}"}
        for i, (name, body) in enumerate(sections)
        if name not in ("NAME", "SEE ALSO", "AUTHOR")
    ]
    return command.strip(), purpose.strip(), docs


# ----------------------------------------------------------------------------- benchmarks


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[a-z)])\. (?=[A-Z])", flat) if 50 <= len(s) <= 300]


def cloze_items(prefix: str, docs: list[dict], rng: random.Random, limit: int) -> list[dict]:
    """Predict a sentence's last word among four words of the same document (held-out text)."""
    items = []
    for doc in docs:
        vocab = sorted({w for w in WORD.findall(doc["text"]) if len(w) >= 4 and w.isalpha()})
        for sentence in sentences(doc["text"]):
            match = re.match(r"^(.*\S)\s+([A-Za-z]{4,})\.?$", sentence)
            if not match:
                continue
            context, answer = match.groups()
            pool = [w for w in vocab if w.lower() != answer.lower()]
            if len(pool) < 3 or len(context.split()) < 8:
                continue
            choices = rng.sample(pool, 3) + [answer]
            rng.shuffle(choices)
            items.append(
                {
                    "query": context,
                    "choices": [" " + c for c in choices],
                    "gold": choices.index(answer),
                    "source": doc["id"],
                }
            )
    rng.shuffle(items)
    items = sorted(items[:limit], key=lambda item: item["source"])
    return [{"id": f"{prefix}-{i:04d}", **item} for i, item in enumerate(items)]


def command_items(commands: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Name the PostgreSQL command from its one-line purpose (knowledge only the new corpus has)."""
    pairs = sorted({(c, p) for c, p in commands if c and p})
    names = sorted({c for c, _ in pairs})
    items = []
    for i, (command, purpose) in enumerate(pairs):
        choices = rng.sample([n for n in names if n != command], 3) + [command]
        rng.shuffle(choices)
        items.append(
            {
                "id": f"sqlcmd-{i:04d}",
                "query": f"In PostgreSQL, to {purpose}, use the command",
                "choices": [" " + c for c in choices],
                "gold": choices.index(command),
            }
        )
    return items


def decontaminate(items: list[dict], corpora: list[list[dict]]) -> list[dict]:
    seen: set[tuple[str, ...]] = set()
    for docs in corpora:
        for doc in docs:
            seen |= word_ngrams(doc["text"], NGRAM)
    return [item for item in items if not word_ngrams(item["query"] + item["choices"][item["gold"]], NGRAM) & seen]


# ----------------------------------------------------------------------------- QA


def qa_documents(commands: list[tuple[str, str, list[dict]]], python_docs: list[dict]) -> list[dict]:
    docs = []
    for command, purpose, sections in commands:
        if command and purpose:
            docs.append(
                {
                    "id": f"qa:pg:{command}",
                    "text": f"Question: What does the PostgreSQL command {command} do?\n"
                    f"Answer: It is used to {purpose}.",
                }
            )
        for section in sections:
            if section["text"].split("\n", 1)[0].endswith("Synopsis"):
                body = section["text"].split("\n\n", 1)[1]
                docs.append(
                    {
                        "id": f"qa:pg:{command}:synopsis",
                        "text": f"Question: What is the syntax of {command} in PostgreSQL?\nAnswer:\n{body}",
                    }
                )
    for doc in python_docs:
        header, _, body = doc["text"].partition("\n\n")
        summary = body.split("\n\n", 1)[0].replace("\n", " ")
        if header.startswith("def ") and 30 <= len(summary) <= 300:
            docs.append(
                {
                    "id": f"qa:{doc['id']}",
                    "text": f"Question: What does the Python function {doc['title']} do?\nAnswer: {summary}",
                }
            )
    return sorted(docs, key=lambda d: d["id"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(payload)
    else:
        path.write_bytes(payload)
    print(f"{path.relative_to(HERE)}: {len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB")


def main() -> None:
    warnings.simplefilter("ignore")  # deprecation noise from importing every stdlib module
    rng = random.Random(SEED)
    python_docs, python_held = [], []
    for name in stdlib_modules():
        (python_held if bucket(name.split(".")[0]) < HELD_OUT_PERCENT else python_docs).extend(module_documents(name))
    python_docs.sort(key=lambda d: d["id"])
    kept, size = [], 0
    for doc in python_docs:  # cap by bytes, keeping whole modules in id order
        size += len(doc["text"].encode())
        if size > LEGACY_MAX_BYTES:
            break
        kept.append(doc)
    python_docs = kept
    pages, pg_docs, pg_held = [], [], []
    for path in postgres_pages():
        command, purpose, docs = page_documents(path)
        pages.append((command, purpose, docs))
        (pg_held if bucket(path.name) < HELD_OUT_PERCENT else pg_docs).extend(docs)
    train_pages = [p for p in pages if not any(d in pg_held for d in p[2][:1])]
    qa = qa_documents(train_pages, python_docs)
    strip = lambda docs: [{"id": d["id"], "text": d["text"]} for d in docs]  # noqa: E731
    write_jsonl(HERE / "legacy_python_docs.jsonl.gz", strip(python_docs))
    write_jsonl(HERE / "new_postgres_docs.jsonl.gz", strip(pg_docs))
    write_jsonl(HERE / "qa_docs.jsonl.gz", strip(qa))
    corpora = [python_docs, pg_docs, qa]
    benchmarks = {
        "sql_commands": command_items([(c, p) for c, p, _ in pages], rng),
        "sql_cloze": cloze_items("sqlcloze", pg_held, rng, 1000),
        "python_cloze": cloze_items("pycloze", python_held, rng, 1000),
    }
    for name, items in benchmarks.items():
        clean_items = decontaminate(items, corpora)
        print(f"{name}: dropped {len(items) - len(clean_items)} items sharing a {NGRAM}-gram with a corpus")
        write_jsonl(
            HERE / "benchmarks" / f"{name}.jsonl", [{k: v for k, v in i.items() if k != "source"} for i in clean_items]
        )


if __name__ == "__main__":
    sys.exit(main())
