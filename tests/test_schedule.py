"""LR schedules against exact values, and the closed-form threshold step against brute force."""

import math

import pytest

from refit.stages.core.schedule import Schedule


def test_paper_case_switch_at_71_percent():
    # no warmup, cosine to max_lr/100, switch at max_lr/5: about 71.1% of the run
    schedule = Schedule(max_lr=4.5e-5, total_steps=100_001)
    step = schedule.first_step_at_or_below(0.2)
    assert step / 100_000 == pytest.approx(0.7113, abs=1e-4)
    assert schedule.lr(step) <= 0.2 * 4.5e-5 < schedule.lr(step - 1)


def test_exact_values():
    cosine = Schedule(max_lr=1.0, total_steps=11, min_lr_ratio=0.0)
    assert [round(cosine.lr(s), 12) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert cosine.lr(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    warm = Schedule(max_lr=2.0, total_steps=14, warmup_steps=4, decay="linear", min_lr_ratio=0.1)
    assert [warm.lr(s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert warm.lr(4) == 2.0 and warm.lr(13) == pytest.approx(0.2) and warm.lr(8) == pytest.approx(2.0 - 1.8 * 4 / 9)
    wsd = Schedule(max_lr=1.0, total_steps=10, decay="wsd", wsd_decay_steps=3, min_lr_ratio=0.0)
    assert [round(wsd.lr(s), 12) for s in range(10)] == [1.0] * 8 + [0.5, 0.0]
    constant = Schedule(max_lr=3.0, total_steps=5, decay="constant")
    assert {constant.lr(s) for s in range(5)} == {3.0}


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("warmup", [0, 7])
@pytest.mark.parametrize("fraction", [0.5, 0.2, 0.1, 0.02, 0.0101])
@pytest.mark.parametrize("total", [50, 997])
def test_first_step_matches_brute_force(decay, warmup, fraction, total):
    schedule = Schedule(max_lr=3e-4, total_steps=total, warmup_steps=warmup, decay=decay, wsd_decay_steps=total // 5)
    expected = next((s for s in range(warmup, total) if schedule.lr(s) <= fraction * 3e-4), None)
    assert schedule.first_step_at_or_below(fraction) == expected


def test_unreachable_thresholds():
    assert Schedule(max_lr=1.0, total_steps=10, decay="constant").first_step_at_or_below(0.5) is None
    assert Schedule(max_lr=1.0, total_steps=10, min_lr_ratio=0.3).first_step_at_or_below(0.2) is None


def test_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        Schedule(max_lr=1.0, total_steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="wsd_decay_steps"):
        Schedule(max_lr=1.0, total_steps=10, decay="wsd", wsd_decay_steps=0)
