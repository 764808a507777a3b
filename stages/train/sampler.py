"""The order of training sequences: a pure function of (seed, manifest, step).

Global sequence slot g = step x sequences_per_step + i. Each phase assigns its slots to
sources by deterministic blending: source s takes the slots where its ideal positions
(k + 1/2) / w_s fall, so over every prefix of a phase each source's count is within one of
its weight times the slots. Each source is read in a fresh permutation per epoch, seeded by
(seed, source, epoch), and its draws are counted across phases, so no sequence repeats
before its source is exhausted. Resuming at step k therefore needs nothing but k.

The optimizer warm-up (train.optimizer_warmup_steps, at LR 0 before step 0) draws from a
stream of its own: the blend of the first phase (the one step 0 trains on) over its slots,
each source read in permutations seeded apart from the schedule's. Its steps are as pure a
function of their number as the scheduled ones, its sequences are another sample of the
same data (not the batches the first steps will train on), and the scheduled steps read
exactly what they read without a warm-up.

An anneal ingredient (`ingredient` i >= 1: one of the copies of the last phase that train from
the same checkpoint and are averaged into a soup, soup.py) reads the last phase's slots in an
order of its own, a permutation seeded by (seed, i) apart from every source's: the same
sequences as ingredient 0 there, in another order, and the same steps before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refit.stages.core.shards import read_shard
from refit.stages.mix.manifest import Manifest, PhasePlan

# the fourth seed word of the warm-up stream's permutations; the schedule's seeds have three,
# which numpy pads with 0 ([seed, source, epoch] seeds as [seed, source, epoch, 0] does)
WARMUP_STREAM = 1
# the fourth seed word of an ingredient's order of the last phase, [seed, ingredient, 0, 2]:
# apart from the schedule's and the warm-up's permutations
INGREDIENT_STREAM = 2


@dataclass
class SourceRows:
    name: str
    shards: list[np.ndarray]  # memory-mapped (rows, seq_len) views
    offsets: np.ndarray  # first global row of each shard

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def row(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.shards[shard][index - self.offsets[shard]]


@dataclass
class Stream:
    """Which source, and which of its draws, fills each slot of a sequence of steps."""

    owner: np.ndarray  # source index of each slot
    draw: np.ndarray  # draw number of each slot within its source, counted over the stream
    seed_words: tuple[int, ...]  # after (seed, source, epoch) in the seed of its permutations

    @classmethod
    def of(cls, owner: np.ndarray, sources: int, seed_words: tuple[int, ...] = ()) -> Stream:
        draw = np.empty(len(owner), dtype=np.int64)
        for source in range(sources):
            mask = owner == source
            draw[mask] = np.arange(int(mask.sum()))
        return cls(owner, draw, seed_words)


def blend(weights: np.ndarray, slots: int) -> np.ndarray:
    """Source index of each of `slots` consecutive slots for the given normalised weights."""
    positions, owners = [], []
    for source, weight in enumerate(weights):
        if weight > 0:
            count = int(np.ceil(slots * weight)) + 1
            positions.append((np.arange(count) + 0.5) / weight)
            owners.append(np.full(count, source))
    positions_all, owners_all = np.concatenate(positions), np.concatenate(owners)
    order = np.lexsort((owners_all, positions_all))  # by position, ties by source order
    return owners_all[order][:slots]


class Sampler:
    def __init__(self, manifest: Manifest, workdir: Path, optimizer_warmup_steps: int = 0, ingredient: int = 0):
        self.seed = manifest.seed
        self.per_step = manifest.sequences_per_step
        self.sources = []
        for name in manifest.sources:
            shards = [read_shard(Path(workdir) / s.path) for s in manifest.sources[name].shards]
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
            self.sources.append(SourceRows(name, shards, offsets))
        owner = np.empty(manifest.total_steps * self.per_step, dtype=np.int64)
        for phase in manifest.phases:
            first = phase.start_step * self.per_step
            owner[first : first + phase.steps * self.per_step] = self._blend(phase, phase.steps * self.per_step)
        self.scheduled = Stream.of(owner, len(self.sources))
        if ingredient:
            self._reorder_last_phase(manifest, ingredient)
        self.warmup_phase = next(i for i, phase in enumerate(manifest.phases) if phase.steps)  # step 0's
        warmup_slots = optimizer_warmup_steps * self.per_step
        warmup_owner = self._blend(manifest.phases[self.warmup_phase], warmup_slots)
        self.warmup = Stream.of(warmup_owner, len(self.sources), (WARMUP_STREAM,))
        self._permutations: dict[tuple, np.ndarray] = {}

    def _reorder_last_phase(self, manifest: Manifest, ingredient: int) -> None:
        """Permute the last phase's slots (which source, and which of its draws, fills each)."""
        last = [phase for phase in manifest.phases if phase.steps][-1]
        slots = slice(last.start_step * self.per_step, (last.start_step + last.steps) * self.per_step)
        rng = np.random.default_rng([self.seed, ingredient, 0, INGREDIENT_STREAM])
        order = rng.permutation(last.steps * self.per_step)
        self.scheduled.owner[slots] = self.scheduled.owner[slots][order]
        self.scheduled.draw[slots] = self.scheduled.draw[slots][order]

    def _blend(self, phase: PhasePlan, slots: int) -> np.ndarray:
        """The phase's blend over `slots` slots, refused when it draws from a source with no rows."""
        if not slots:
            return np.empty(0, dtype=np.int64)
        weights = np.array([phase.weights.get(source.name, 0.0) for source in self.sources])
        empty = [source.name for source, w in zip(self.sources, weights) if w > 0 and not source.rows]
        if empty:
            raise ValueError(f"phase {phase.name} draws from source(s) with no tokens: {', '.join(empty)}")
        return blend(weights, slots)

    def _permutation(self, stream: Stream, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch, *stream.seed_words)
        if key not in self._permutations:
            rng = np.random.default_rng([self.seed, *key])
            self._permutations[key] = rng.permutation(self.sources[source].rows)
        return self._permutations[key]

    def _stream(self, warmup: bool) -> Stream:
        return self.warmup if warmup else self.scheduled

    def slot(self, index: int, warmup: bool = False) -> tuple[int, int]:
        """(source index, row within the source) of global slot `index` of the schedule's stream
        (or of the optimizer warm-up's)."""
        stream = self._stream(warmup)
        source, draw = int(stream.owner[index]), int(stream.draw[index])
        rows = self.sources[source].rows
        return source, int(self._permutation(stream, source, draw // rows)[draw % rows])

    def batch(self, step: int, slots: range, warmup: bool = False) -> np.ndarray:
        """Rows (as int64 token ids) for the given slot offsets within an optimizer step (or
        within an optimizer warm-up step)."""
        base = step * self.per_step
        rows = (self.slot(base + i, warmup) for i in slots)
        return np.stack([self.sources[s].row(r) for s, r in rows]).astype(np.int64)

    def phase_counts(self, step: int, warmup: bool = False) -> dict[str, int]:
        """Sequences drawn per source in one step (for the metrics log)."""
        owners = self._stream(warmup).owner[step * self.per_step : (step + 1) * self.per_step]
        return {self.sources[i].name: int((owners == i).sum()) for i in range(len(self.sources))}
