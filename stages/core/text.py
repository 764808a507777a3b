"""Text normalisation and word n-grams, shared by curation, decontamination and the data build."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from refit.stages.core.input_files import load_benchmark

WORD = re.compile(r"\w+")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
# C0/C1 control characters other than tab and newline: binary junk in a text corpus
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def normalise(text: str) -> str:
    """NFC Unicode; CRLF, CR, form feed and vertical tab to newlines; no trailing spaces;
    at most one blank line in a row; no leading or trailing whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n").replace("\v", "\n")
    text = _TRAILING_SPACE.sub("\n", text.replace("\u00a0", " "))
    return _BLANK_LINES.sub("\n\n", text).strip()


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """n-grams of lower-cased words: the unit of benchmark contamination (13 by default)."""
    words = WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def benchmark_ngrams(benchmarks: list, n: int) -> dict[tuple[str, ...], str]:
    """n-gram -> "benchmark:item id", over each item's query and gold answer."""
    owners: dict[tuple[str, ...], str] = {}
    for bench in benchmarks:
        for item in load_benchmark(Path(bench.path)):
            for gram in word_ngrams(item["query"] + item["choices"][item["gold"]], n):
                owners.setdefault(gram, f"{bench.name}:{item['id']}")
    return owners
