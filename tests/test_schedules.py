"""schedules.py on its own: each learning-rate schedule against values worked out by hand, and the
calendar's count of the pauses left (the eta's) against counting step by step."""

import itertools
import math

import pytest

import schedules
from schedules import Calendar

SETTINGS = dict(lr=1.0, warmup_steps=4, max_steps=24, min_lr_ratio=0.1, lr_decay_fraction=0.25)


def by_hand(name, step):
    """What each schedule should give for SETTINGS, written out independently."""
    if step < 4:
        return (step + 1) / 4  # warmup: 0.25, 0.5, 0.75, 1.0
    if name == "linear_with_warmup":
        return 1 - (step - 4) / 20  # from 1 at step 4 to 0 at step 24
    if name == "cosine":
        return 0.1 + 0.9 * (1 + math.cos(math.pi * (step - 4) / 20)) / 2
    if step < 18:  # wsd: 24 - 0.25 x 24 = 18, the decay's first step
        return 1.0
    return 1 - 0.9 * (step - 18) / 6  # to 0.1 at step 24


@pytest.mark.parametrize("name", ["linear_with_warmup", "cosine", "wsd"])
def test_each_schedule_gives_the_rates_worked_out_by_hand(name):
    got = [schedules.SCHEDULES[name](step, **SETTINGS) for step in range(25)]
    assert got == pytest.approx([by_hand(name, step) for step in range(25)], abs=1e-12)
    assert got[3] == 1.0 and got[0] == 0.25  # the same warmup for all


def test_wsd_holds_the_rate_until_its_decay_and_ends_at_the_floor():
    wsd = schedules.SCHEDULES["wsd"]
    long = dict(SETTINGS, max_steps=1000, lr_decay_fraction=0.1)
    assert {wsd(step, **long) for step in range(4, 900)} == {1.0}  # stable: whatever max_steps will be
    assert wsd(899, **long) == 1.0 and wsd(901, **long) < 1.0 and wsd(1000, **long) == pytest.approx(0.1)
    assert wsd(24, **dict(SETTINGS, lr_decay_fraction=0.0)) == 1.0  # no decay at all
    whole = dict(SETTINGS, lr_decay_fraction=1.0)  # a decay over the whole run starts when the warmup ends
    assert wsd(4, **whole) == 1.0 and wsd(14, **whole) == pytest.approx(1 - 0.9 * 10 / 20)


def test_the_pauses_left_are_those_counted_one_step_at_a_time():
    for max_steps, every, log_until, eval_every in itertools.product([1, 7, 16, 100], [1, 3, 50], [0, 1, 32],
                                                                     [None, 0, 4, 10]):
        calendar = Calendar(max_steps, every, log_until, eval_every)
        for step in range(max_steps + 1):
            counted = sum(calendar.saves(s) or calendar.evaluates(s) for s in range(step, max_steps + 1))
            assert calendar.pauses_from(step) == counted, (calendar, step)
    demo = Calendar(100, 50, 32)  # the demo: 0, 1, 2, 4, 8, 16, 32, 50 and 100
    assert [s for s in range(101) if demo.saves(s)] == [0, 1, 2, 4, 8, 16, 32, 50, 100]
    assert demo.pauses_from(100) == 1 and demo.pauses_from(50) == 2  # the step logged still has its own to come
