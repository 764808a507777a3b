"""LR schedules against exact values, the closed-form threshold step against brute force, and
the phase each step trains on against the switch steps that mix plans (no model is trained)."""

import math

import pytest

from refit.stages.core.schedule import Schedule, phase_at


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


def test_the_switch_at_max_lr_over_5_happens_at_the_step_mix_plans():
    schedule = Schedule(max_lr=4.5e-5, total_steps=1001)
    switch = schedule.first_step_at_or_below(0.2)  # what mix writes as the phase's start_step
    assert schedule.lr(switch) <= 4.5e-5 / 5 < schedule.lr(switch - 1)
    phases = [None, 0.2]
    assert [phase_at(schedule, phases, s) for s in (0, switch - 1, switch, switch + 1)] == [0, 0, 1, 1]


def test_the_last_phase_holds_to_the_last_step_and_beyond():
    schedule = Schedule(max_lr=1.0, total_steps=20, warmup_steps=3, decay="linear")
    assert [phase_at(schedule, [None, 0.5], s) for s in (19, 20, 1000)] == [1, 1, 1]


def test_a_single_phase_run_never_switches():
    schedule = Schedule(max_lr=1.0, total_steps=20, min_lr_ratio=0.0)
    assert {phase_at(schedule, [None], s) for s in range(25)} == {0}


def test_warmup_trains_on_the_first_phase_though_its_lr_is_below_every_threshold():
    schedule = Schedule(max_lr=1.0, total_steps=20, warmup_steps=10)
    assert schedule.lr(0) == 0.1 and phase_at(schedule, [None, 0.5, 0.2], 0) == 0
    assert {phase_at(schedule, [None, 0.5, 0.2], s) for s in range(10)} == {0}


def test_thresholds_that_fire_at_the_same_step_go_straight_to_the_later_phase():
    # WSD drops from max_lr to 0 in one step: 0.5 and 0.2 both fire at step 9
    schedule = Schedule(max_lr=1.0, total_steps=10, decay="wsd", wsd_decay_steps=2, min_lr_ratio=0.0)
    assert [phase_at(schedule, [None, 0.5, 0.2], s) for s in (8, 9)] == [0, 2]


def test_a_threshold_the_lr_never_reaches_never_fires():
    constant = Schedule(max_lr=1.0, total_steps=10, decay="constant")
    floored = Schedule(max_lr=1.0, total_steps=10, min_lr_ratio=0.3)
    assert {phase_at(schedule, [None, 0.2], s) for schedule in (constant, floored) for s in range(12)} == {0}


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd", "constant"])
@pytest.mark.parametrize("warmup", [0, 7])
@pytest.mark.parametrize("total", [50, 997])
def test_every_step_trains_on_the_phase_of_mix_s_plan(decay, warmup, total):
    """Mix plans phase i from first_step_at_or_below(lr_below[i]) (never, when that is None);
    phase_at reads the LR at each step. Both give every step the same phase."""
    schedule = Schedule(max_lr=3e-4, total_steps=total, warmup_steps=warmup, decay=decay, wsd_decay_steps=total // 5)
    lr_below = [None, 0.5, 0.2, 0.05]
    starts = [0] + [schedule.first_step_at_or_below(fraction) for fraction in lr_below[1:]]
    for step in range(total + 2):
        planned = max(i for i, start in enumerate(starts) if start is not None and start <= step)
        assert phase_at(schedule, lr_below, step) == planned, step
