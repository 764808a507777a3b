"""Files a recipe names besides its sources (benchmarks here, the safety probe files in
stages/evaluate/safety_probes.py), read whole and checked before anything is scored: a file
or item that cannot be used is an InputFileError naming file and line, never a traceback
from the middle of a run. Robust by construction: whatever reading, decoding, parsing or
checking one line raises becomes that error, and a line is never held past MAX_LINE_BYTES.
"""

from __future__ import annotations

import gzip
import json
import reprlib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

MAX_LINE_BYTES = 16 << 20  # an item longer than this is an error, not read whole
T = TypeVar("T")


class InputFileError(ValueError):
    """A file that cannot be used, with the file and line at fault."""


def _error(error: BaseException) -> str:
    return error.msg if isinstance(error, json.JSONDecodeError) else f"{type(error).__name__}: {error}"


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, line) of a UTF-8 text file, plain or .gz, each line with its line ending (a
    byte order mark before the first dropped)."""
    path, number = Path(path), 0
    if not path.is_file():  # a folder, a FIFO (opening one waits for a writer), a broken link
        raise InputFileError(f"{path}, line 1: not a readable file")
    try:
        with open(path, "rb") as raw, gzip.open(raw) if path.suffix == ".gz" else raw as handle:
            while line := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(line) > MAX_LINE_BYTES:
                    raise InputFileError(f"{path}, line {number}: longer than {MAX_LINE_BYTES:,} bytes")
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise InputFileError(f"{path}, line {number}: not UTF-8 (byte {error.start}: {error.reason})")
                yield number, text.removeprefix("\ufeff") if number == 1 else text
    except (OSError, EOFError, zlib.error) as error:  # unreadable, a truncated or corrupt gzip
        raise InputFileError(f"{path}, line {number + 1}: cannot be read ({_error(error)})") from None


def json_lines(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(number, where, value) of each non-blank line of a JSONL file; where: "<file>, line <number>"."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except Exception as error:  # JSONDecodeError, and what Python's parser caps: nesting, long integers
            raise InputFileError(f"{where}: not JSON ({_error(error)})") from None
        yield number, where, value


def item_at(where: str, make: Callable[..., T], *args: Any) -> T:
    """make(*args), one item of a file: an InputFileError it raises names its problem; any other
    exception (a malformed item that no check foresaw) becomes one naming where."""
    try:
        return make(*args)
    except InputFileError:
        raise
    except Exception as error:
        raise InputFileError(f"{where}: {_error(error)}") from None


def load_benchmark(path: Path) -> list[dict]:
    """The items of a benchmark file, JSONL {"id", "query", "choices", "gold"}, each checked:
    an id (string or integer), a non-empty query, at least two non-empty choices (strings)
    and gold an integer index of one of them; ids unique (scores are paired by id), at least one item."""
    items, lines = [], {}
    for number, where, item in json_lines(path):
        items.append(item_at(where, _benchmark_item, where, item))
        if (first := lines.setdefault(items[-1]["id"], number)) != number:
            raise InputFileError(f"{where}: id {reprlib.repr(items[-1]['id'])} repeats line {first}")
    if not items:
        raise InputFileError(f"{path}, line 1: no benchmark item in the file")
    return items


def _benchmark_item(where: str, item: Any) -> dict:
    if not isinstance(item, dict):
        raise InputFileError(f"{where}: a JSON {type(item).__name__}, not an object")
    missing = [field for field in ("id", "query", "choices", "gold") if field not in item]
    if missing:
        raise InputFileError(f"{where}: missing field(s) {', '.join(missing)}")
    if isinstance(item["id"], bool) or not isinstance(item["id"], str | int):
        raise InputFileError(f"{where}: id {reprlib.repr(item['id'])} is not a string or an integer")
    if not isinstance(item["query"], str) or not item["query"]:
        raise InputFileError(f"{where}: query must be a non-empty string")
    choices = item["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise InputFileError(f"{where}: choices must be a list of at least two non-empty strings")
    if type(item["gold"]) is not int or not 0 <= item["gold"] < len(choices):
        gold = reprlib.repr(item["gold"])
        raise InputFileError(f"{where}: gold {gold} is not the index of one of the {len(choices)} choices")
    return item
