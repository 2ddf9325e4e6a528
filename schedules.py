"""
When things happen in a run: the learning rate at each step, and the steps that pause training for
a checkpoint or an evaluation (Calendar).

The learning-rate schedules are one function each, by name in SCHEDULES (train.py's `lr_scheduler`
picks one, and the settings check refuses a name that is not there).

Each gives the learning rate of the optimizer step that takes the weights from `step` to `step + 1`,
from the settings it needs, passed by keyword (train.py passes them all; each takes what it uses).
None reads a global, so a test calls them as they are (tests/test_schedules.py). All warm up the
same way: linearly, from lr / warmup_steps at step 0 to lr at step warmup_steps - 1.

To add one: write the function here, add it to SCHEDULES, and test it against a few values worked
out by hand.
"""

import math
from dataclasses import dataclass


def linear_with_warmup(step, lr, warmup_steps, max_steps, **_):
    """pico-train's: warm up, then fall linearly to 0 at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (1.0 - min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps)))


def cosine(step, lr, warmup_steps, max_steps, min_lr_ratio=0.0, **_):
    """Warm up, then half a cosine from lr down to lr * min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def wsd(step, lr, warmup_steps, max_steps, min_lr_ratio=0.0, lr_decay_fraction=0.1, **_):
    """Warmup-stable-decay, as MiniCPM and DeepSeek LLM train: warm up, hold lr, and only in the
    last lr_decay_fraction of max_steps (never before the warmup ends) fall linearly to
    lr * min_lr_ratio at max_steps. Until the decay the rate does not depend on max_steps, so a run
    can be lengthened midway."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_start = max(warmup_steps, max_steps - round(lr_decay_fraction * max_steps))
    if step < decay_start:
        return lr
    return lr * (1.0 - (1 - min_lr_ratio) * min(1.0, (step - decay_start) / max(1, max_steps - decay_start)))


SCHEDULES = {"linear_with_warmup": linear_with_warmup, "cosine": cosine, "wsd": wsd}


@dataclass(frozen=True)
class Calendar:
    """The steps at which a run pauses: a checkpoint at step 0, every save_every_n_steps, at the powers
    of two up to save_log_spaced_until (early learning moves fastest) and at max_steps; an
    evaluation with every checkpoint (eval_every_n_steps None), or every eval_every_n_steps and at
    max_steps (0: at max_steps only)."""
    max_steps: int
    save_every_n_steps: int
    save_log_spaced_until: int = 0
    eval_every_n_steps: int | None = None

    def saves(self, step):
        return (step % self.save_every_n_steps == 0 or step == self.max_steps
                or (step <= self.save_log_spaced_until and step & (step - 1) == 0))

    def evaluates(self, step):
        if self.eval_every_n_steps is None:
            return self.saves(step)
        return step == self.max_steps or bool(self.eval_every_n_steps) and step % self.eval_every_n_steps == 0

    def pauses_from(self, step):
        """How many steps of step .. max_steps (both included) pause for a checkpoint or an evaluation."""
        def multiples(n):  # of n in [step, max_steps]
            return self.max_steps // n - (step - 1) // n
        every = [self.save_every_n_steps] + ([self.eval_every_n_steps] if self.eval_every_n_steps else [])
        count = sum(map(multiples, every)) - (multiples(math.lcm(*every)) if len(every) == 2 else 0)
        others = {2**k for k in range(63) if 2**k <= self.save_log_spaced_until} | {self.max_steps}  # off that grid
        return count + sum(step <= s <= self.max_steps and all(s % n for n in every) for s in others)
