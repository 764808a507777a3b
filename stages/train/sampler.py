"""The order of training sequences: a pure function of (seed, manifest, step).

Global sequence slot g = step x sequences_per_step + i. Each phase assigns its slots to
sources by deterministic blending: source s takes the slots where its ideal positions
(k + 1/2) / w_s fall, so over every prefix of a phase each source's count is within one of
its weight times the slots. Each source is read in a fresh permutation per epoch, seeded by
(seed, source, epoch), and its draws are counted across phases, so no sequence repeats
before its source is exhausted. Resuming at step k therefore needs nothing but k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refit.stages.core.shards import read_shard
from refit.stages.mix.manifest import Manifest


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
    def __init__(self, manifest: Manifest, workdir: Path):
        self.seed = manifest.seed
        self.per_step = manifest.sequences_per_step
        names = list(manifest.sources)
        self.sources = []
        for name in names:
            shards = [read_shard(Path(workdir) / s.path) for s in manifest.sources[name].shards]
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
            self.sources.append(SourceRows(name, shards, offsets))
        total = manifest.total_steps * self.per_step
        owner = np.empty(total, dtype=np.int64)
        for phase in manifest.phases:
            first, last = phase.start_step * self.per_step, (phase.start_step + phase.steps) * self.per_step
            weights = np.array([phase.weights.get(name, 0.0) for name in names])
            if last > first:
                empty = [n for n, w in zip(names, weights) if w > 0 and not self.sources[names.index(n)].rows]
                if empty:
                    raise ValueError(f"phase {phase.name} draws from source(s) with no tokens: {', '.join(empty)}")
                owner[first:last] = blend(weights, last - first)
        self.owner = owner
        # draw number of each slot within its source, counted over the whole run
        self.draw = np.empty(total, dtype=np.int64)
        for source in range(len(names)):
            mask = owner == source
            self.draw[mask] = np.arange(int(mask.sum()))
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._permutations:
            rng = np.random.default_rng([self.seed, source, epoch])
            self._permutations[key] = rng.permutation(self.sources[source].rows)
        return self._permutations[key]

    def slot(self, index: int) -> tuple[int, int]:
        """(source index, row within the source) of global slot `index`."""
        source, draw = int(self.owner[index]), int(self.draw[index])
        rows = self.sources[source].rows
        return source, int(self._permutation(source, draw // rows)[draw % rows])

    def batch(self, step: int, slots: range) -> np.ndarray:
        """Rows (as int64 token ids) for the given slot offsets within an optimizer step."""
        base = step * self.per_step
        return np.stack([self.sources[s].row(r) for s, r in (self.slot(base + i) for i in slots)]).astype(np.int64)

    def phase_counts(self, step: int) -> dict[str, int]:
        """Sequences drawn per source in one step (for the metrics log)."""
        owners = self.owner[step * self.per_step : (step + 1) * self.per_step]
        return {self.sources[i].name: int((owners == i).sum()) for i in range(len(self.sources))}
