"""Learning-rate schedules as short pure functions, when the LR crosses a threshold, and so
which data phase a step trains on.

Steps are optimizer steps counted from 0; `lr(step)` is the LR used *at* that step, and
the last step (total_steps - 1) ends exactly at min_lr_ratio x max_lr.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from refit.stages.core.config import Recipe

Decay = Literal["cosine", "linear", "wsd", "constant"]


@dataclass(frozen=True)
class Schedule:
    max_lr: float
    total_steps: int
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    decay: Decay = "cosine"
    wsd_decay_steps: int = 0  # only for decay="wsd": steps of the final linear decay

    def __post_init__(self) -> None:
        if self.total_steps <= self.warmup_steps:
            raise ValueError(f"total_steps {self.total_steps} must exceed warmup_steps {self.warmup_steps}")
        if self.decay == "wsd" and not 0 < self.wsd_decay_steps <= self.total_steps - self.warmup_steps:
            raise ValueError(
                f"wsd_decay_steps {self.wsd_decay_steps} must be in 1..{self.total_steps - self.warmup_steps}"
            )

    @property
    def min_lr(self) -> float:
        return self.max_lr * self.min_lr_ratio

    @property
    def decay_start(self) -> int:
        """First step of the decaying part (WSD holds max_lr until here)."""
        if self.decay == "wsd":
            return self.total_steps - self.wsd_decay_steps
        return self.warmup_steps

    def _progress(self, step: int) -> float:
        """0 at decay_start, 1 at the last step."""
        span = self.total_steps - 1 - self.decay_start
        return 1.0 if span <= 0 else min(max((step - self.decay_start) / span, 0.0), 1.0)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:  # linear warmup that reaches max_lr at its last step
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.max_lr
        p = self._progress(step)
        # cosine: half a cosine period from max to min; linear and wsd's tail: a straight line
        shape = 0.5 * (1 + math.cos(math.pi * p)) if self.decay == "cosine" else 1 - p
        return self.min_lr + (self.max_lr - self.min_lr) * shape

    def first_step_at_or_below(self, fraction: float) -> int | None:
        """The first step after warmup whose LR is <= fraction x max_lr, in closed form.

        None when the LR never gets there (constant decay, or a floor above the target).
        The paper's switch at max_lr/5 under cosine to max_lr/100 lands at ~71.1% of the run.
        """
        target = fraction * self.max_lr
        if self.decay == "constant" or target < self.min_lr:
            return None if target < self.max_lr else self.warmup_steps
        if target >= self.max_lr:
            return self.warmup_steps
        shape = (target - self.min_lr) / (self.max_lr - self.min_lr)  # in [0, 1)
        p = math.acos(2 * shape - 1) / math.pi if self.decay == "cosine" else 1 - shape
        span = self.total_steps - 1 - self.decay_start
        step = self.decay_start + math.ceil(p * span - 1e-9)
        # the closed form can be one step off through rounding; settle it on lr() itself
        while step > self.decay_start and self.lr(step - 1) <= target:
            step -= 1
        while step < self.total_steps and self.lr(step) > target:
            step += 1
        return step if step < self.total_steps else None


def phase_at(schedule: Schedule, lr_below: Sequence[float | None], step: int) -> int:
    """The phase that `step` trains on: the last one whose trigger has fired, that is, after
    warmup, LR <= its lr_below x max_lr (lr_below[i] is phase i's; None for the first, which
    starts at step 0). Thresholds decrease and the LR does not rise after warmup, so each
    fires once, in order, at the step that `first_step_at_or_below` gives mix for its plan."""
    if step < schedule.warmup_steps:
        return 0
    lr = schedule.lr(step)
    return max(
        (i for i, fraction in enumerate(lr_below) if fraction is not None and lr <= fraction * schedule.max_lr),
        default=0,
    )


def tokens_per_step(recipe: Recipe) -> int:
    return recipe.train.sequences_per_step * recipe.tokenize.seq_len


def schedule_for(recipe: Recipe) -> Schedule:
    """The schedule a recipe implies: steps from its token budget and global batch."""
    spec = recipe.schedule
    total = spec.total_tokens // tokens_per_step(recipe)
    return Schedule(
        max_lr=recipe.peak_lr,
        total_steps=total,
        min_lr_ratio=spec.min_lr_ratio,
        warmup_steps=int(spec.warmup_fraction * total),
        decay=spec.decay,
        wsd_decay_steps=max(1, round(spec.wsd_decay_fraction * (total - int(spec.warmup_fraction * total)))),
    )
