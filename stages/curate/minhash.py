"""Fast MinHash signatures in datatrove's signature-file format.

datatrove's MinhashDedupSignature splits words with spaCy (most of the cost of near-dedupe),
hashes every n-gram string in Python and computes one document's permutations at a time.
`FastMinhashSignature` splits words with a regex (ASCII documents: one byte translation and
a split), hashes each word once with xxh64, combines word hashes into n-gram hashes in numpy
and computes every permutation of a batch of documents at once. It writes the files
datatrove's step writes (`bucket_BBB/RRRRR.minhash.sig`, records of a band of hashes and
the document's index, sorted), so datatrove's MinhashDedupBuckets and MinhashDedupCluster
run on them unchanged.

Differences from datatrove's step:
- Words: the same normalisation as datatrove's `simplify_text` (lower case, numbers as "0",
  punctuation and diacritics removed) and, as spaCy does, a symbol such as a box-drawing
  character is a word of its own; spaCy's English exceptions are not applied ("cannot"
  stays one word where spaCy gives "can" "not", likewise "id" and "dont"), and combining
  spacing marks (category Mc, as in Devanagari) end a word instead of staying inside it.
- Hashes: n-gram hashes come from xxh64 word hashes (config.hash_config.hash_fc is not
  used), and the permutations are multiply-add modulo 2**64 keeping the top bits, instead
  of datatrove's modulo 2**61 - 1. Hash values stay below the bound datatrove's bucket step
  reads up to. Signatures of the two steps therefore must not be mixed in one index.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import regex
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.text import PUNCTUATION
from datatrove.utils.typeshelper import StatHints

# datatrove's NUMBERS_PATTERN (\p{Nd} is re's \d): a number, decimals included, becomes "0"
NUMBER = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")
COMBINING_MARKS = regex.compile(r"\p{Mn}+")  # what datatrove strips after NFD (diacritics)
# a word is a run of letters and digits; any other character that is neither punctuation
# (which datatrove replaces by spaces) nor space is a word of its own, as spaCy splits symbols
WORD = re.compile(r"[^\W_]+|[^\w\s" + re.escape("".join(sorted(set(PUNCTUATION)))) + "]")
# every ASCII character that is not a letter or digit is in datatrove's PUNCTUATION or is space
_ASCII_OTHER = bytes(c for c in range(128) if not chr(c).isalnum())
ASCII_SEPARATORS = bytes.maketrans(_ASCII_OTHER, b" " * len(_ASCII_OTHER))
PERMUTATION_COLUMNS = 8192  # shingles permuted at once: a (hashes x this) uint64 buffer, a few MB


def words(text: str) -> list[str]:
    """The words of text that MinHash shingles, after datatrove's normalisation."""
    if text.isascii():
        return NUMBER.sub("0", text.lower()).encode().translate(ASCII_SEPARATORS).decode().split()
    return unicode_words(text)


def unicode_words(text: str) -> list[str]:
    """`words` for any text (the ASCII fast path gives the same words on ASCII text)."""
    text = COMBINING_MARKS.sub("", unicodedata.normalize("NFD", text))
    return WORD.findall(NUMBER.sub("0", text.lower()))


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every input bit affects every output bit."""
    values ^= values >> np.uint64(30)
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    values ^= values >> np.uint64(31)
    return values


class FastMinhashSignature(PipelineStep):
    """MinHash signatures of each document with at least config.n_grams words, written as
    datatrove's MinhashDedupSignature writes them (see the module docstring)."""

    type = "🫂 - DEDUP"
    name = "🎯 MinHash signatures (vectorised)"

    def __init__(self, output_folder: DataFolderLike, config: MinhashConfig | None = None, batch_words: int = 65536):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)
        self.config = config or MinhashConfig()
        self.batch_words = batch_words  # documents are hashed together until they hold this many words
        num_hashes = self.config.num_buckets * self.config.hashes_per_bucket
        generator = np.random.default_rng(self.config.seed)
        odd = np.uint64(1)
        self.ngram_weights = generator.integers(0, 2**64, size=self.config.n_grams, dtype=np.uint64) | odd
        self.multipliers = generator.integers(0, 2**64, size=(num_hashes, 1), dtype=np.uint64) | odd
        self.offsets = generator.integers(0, 2**64, size=(num_hashes, 1), dtype=np.uint64)
        # keep the top bits: 60 of them stay below 2**61 - 1 and 31 below 2**32 - 1, the
        # values at which datatrove's bucket step stops reading a file (64- and 32-bit)
        self.drop_bits = np.uint64(4 if self.config.hash_config.precision == 64 else 33)
        hashes = self.config.hash_config.struct_format
        self.record = np.dtype(
            [(f"field{i + 1}", f"<{hashes}") for i in range(self.config.hashes_per_bucket)]
            + [(f"field{self.config.hashes_per_bucket + 1}", "<I")]
        )  # datatrove's record layout

    def shingles(self, word_hashes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Hashes of every word n-gram of documents given one after another (document d has
        lengths[d] >= n_grams words), in document order."""
        n = self.config.n_grams
        count = word_hashes.size - n + 1
        combined = word_hashes[:count] * self.ngram_weights[0]
        for k in range(1, n):
            combined += word_hashes[k : k + count] * self.ngram_weights[k]
        document = np.repeat(np.arange(lengths.size), lengths)
        return _mix(combined)[document[:count] == document[n - 1 :]]  # no n-gram across documents

    def signatures(self, shingles: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Minimum of every permutation over each document's shingles: (documents, hashes).
        shingles holds the documents one after another, document d from starts[d]."""
        total = shingles.size
        # cut the shingles into pieces at document starts and every PERMUTATION_COLUMNS, so
        # that each block of columns is reduced to the minima of its pieces
        cuts = np.union1d(starts, np.arange(0, total, PERMUTATION_COLUMNS))
        block_pieces = np.searchsorted(cuts, np.arange(0, total + PERMUTATION_COLUMNS, PERMUTATION_COLUMNS))
        minima = np.empty((self.multipliers.size, cuts.size), dtype=np.uint64)
        buffer = np.empty((self.multipliers.size, min(total, PERMUTATION_COLUMNS)), dtype=np.uint64)
        for block, first in enumerate(range(0, total, PERMUTATION_COLUMNS)):
            columns = shingles[first : first + PERMUTATION_COLUMNS]
            permuted = buffer[:, : columns.size]
            np.multiply(self.multipliers, columns, out=permuted)
            permuted += self.offsets
            pieces = slice(block_pieces[block], block_pieces[block + 1])
            np.minimum.reduceat(permuted, cuts[pieces] - first, axis=1, out=minima[:, pieces])
        documents = np.minimum.reduceat(minima, np.searchsorted(cuts, starts), axis=1)
        return (documents.T >> self.drop_bits).astype(self.config.hash_config.np_dtype)

    def _write(self, buckets: list, documents: list[int], word_hashes: list[np.ndarray]) -> None:
        lengths = np.fromiter((w.size for w in word_hashes), dtype=np.int64, count=len(word_hashes))
        shingles = self.shingles(np.concatenate(word_hashes), lengths)
        starts = np.concatenate(([0], np.cumsum(lengths - self.config.n_grams + 1)[:-1]))
        minima = self.signatures(shingles, starts)
        per_bucket = self.config.hashes_per_bucket
        records = np.empty(len(documents), dtype=self.record)
        records[self.record.names[-1]] = documents
        for bucket, out in enumerate(buckets):
            for i, name in enumerate(self.record.names[:-1]):
                records[name] = minima[:, bucket * per_bucket + i]
            out.write(records.tobytes())

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        paths = [f"bucket_{bucket:03d}/{rank:05d}.minhash.sig" for bucket in range(self.config.num_buckets)]
        with self.track_time():
            buckets = [self.output_folder.open(path, mode="wb") for path in paths]
            documents: list[int] = []  # index in this task's input, as datatrove numbers documents
            word_hashes: list[np.ndarray] = []
            pending = 0
            for index, document in enumerate(data):
                self.stat_update(StatHints.total)
                tokens = words(document.text)
                if len(tokens) < self.config.n_grams:  # no n-gram, no signature: as datatrove does
                    continue
                documents.append(index)
                word_hashes.append(np.fromiter(map(xxhash.xxh64_intdigest, tokens), np.uint64, len(tokens)))
                pending += len(tokens)
                if pending >= self.batch_words:
                    self._write(buckets, documents, word_hashes)
                    documents, word_hashes, pending = [], [], 0
            if documents:
                self._write(buckets, documents, word_hashes)
            for out in buckets:
                out.close()
            for path in paths:  # datatrove's bucket step merges files that are each sorted
                with self.output_folder.open(path, mode="rb") as f:
                    records = np.frombuffer(f.read(), dtype=self.record)
                order = np.lexsort([records[name] for name in reversed(self.record.names)])  # first field first
                with self.output_folder.open(path, mode="wb") as f:
                    f.write(records[order].tobytes())
