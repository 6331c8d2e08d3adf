"""Training under a wall-clock budget: ``medseg train --time-budget 25m``.

A user knows how long they can train ("25 minutes on this laptop", "4 GPU-hours"),
not how many epochs that is. With ``train.time_budget`` set, each fold is sized from
the measured speed of the machine instead of from ``max_epochs``:

1. **Probe** (before the first step): a few forward/backward passes on real training
   batches give the seconds per optimizer step (the first ones, warm-up, are not
   timed), and one forward pass of an inference batch gives the cost of validating a
   window. Weights, normalisation statistics and RNG states are restored afterwards,
   so the probe does not train.
2. **Plan** (:func:`plan_budget`, a pure function): what remains of the budget, minus a
   reserve for the final model write, is split between optimizer steps and
   validations. Validation gets at most ``VALIDATION_SHARE`` of the time, between 1
   and ``MAX_VALIDATIONS`` passes (the last one after the last step). The steps are
   grouped into that many chunks ("epochs"); a checkpoint follows every chunk.
3. **Schedule**: the learning rate follows the poly (or cosine) curve over optimizer
   *steps*, so it reaches its end at the budget, not at a guessed epoch count.
4. **Guard**: after every chunk the remaining steps are re-sized from the speed
   measured so far, and a step that would start past the deadline is not taken: the
   fold ends with the weights it has, which are written like at a normal end.

Time spent is stored in the checkpoint, so ``--resume`` continues with what is left of
the same budget. Under torchrun the ranks use the slowest rank's measurement. With
``--folds`` the budget applies to each fold.

A budget too small to learn anything (fewer than ``MIN_STEPS`` steps) is refused
before training starts, with the smallest budget that would do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from medseg.errors import ConfigError, TrainingError

__all__ = [
    "MAX_VALIDATIONS",
    "MIN_STEPS",
    "MIN_STEPS_3D",
    "BudgetPlan",
    "Choice",
    "choose_configuration",
    "format_duration",
    "parse_duration",
    "plan_budget",
    "time_training_step",
]

MIN_STEPS_3D = 10_000  # a 3D U-Net is chosen only when the budget gives it this many steps (see choose_configuration)
MIN_STEPS = 50  # fewer optimizer steps than this do not move a network off its initialisation
MAX_VALIDATIONS = 10  # validations per fold (the last one after the last step)
VALIDATION_SHARE = 0.1  # at most this share of the budget goes to validation
RESERVE_SHARE = 0.02  # kept for the final model write and checkpoint ...
RESERVE_MIN_S = 5.0  # ... at least this many seconds

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str | float | int | None, *, what: str = "train.time_budget") -> float | None:
    """Seconds in a duration such as ``90s``, ``25m``, ``4h`` or ``1h30m`` (a bare number is seconds).

    Raises:
        ConfigError: not a duration, or not positive.
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise ConfigError(f"{what} {text!r} is not a duration; use e.g. 90s, 25m, 4h or 1h30m.")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", s):
            seconds = float(s)
        elif s and _PART.sub("", s) == "" and re.fullmatch(r"(\d+(?:\.\d+)?[smhd])+", s):
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(s))
        else:
            raise ConfigError(f"{what} {text!r} is not a duration; use e.g. 90s, 25m, 4h or 1h30m.")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{what} {text!r} must be a positive duration, e.g. 90s, 25m, 4h.")
    return seconds


def format_duration(seconds: float) -> str:
    """``1h05m``, ``25m``, ``4m30s``, ``45s``: the way a user writes a budget."""
    seconds = round(max(0.0, float(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    if m:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    return f"{s}s"


@dataclass(frozen=True)
class BudgetPlan:
    """How a fold spends its budget (see the module docstring).

    Attributes:
        budget_s: the fold's budget.
        spent_s: time already spent (resume), included in the budget.
        step_s: measured seconds per optimizer step.
        validation_s: estimated seconds per validation pass (0 without validation cases).
        total_steps: optimizer steps of the whole fold (the schedule's length).
        chunk_steps: steps between validations/checkpoints (the "epoch").
        chunks: number of chunks (``ceil(total_steps / chunk_steps)``).
        reserve_s: kept for the final model write.
    """

    budget_s: float
    spent_s: float
    step_s: float
    validation_s: float
    total_steps: int
    chunk_steps: int
    chunks: int
    reserve_s: float

    def describe(self, batch_size: int, *, resumed_after_s: float = 0.0) -> str:
        """The log line, e.g. ``budget 25m: 1310 steps of batch 2, ~1.1 s/step, validation every 131 steps ...``."""
        val = (
            f"validation every {self.chunk_steps} steps (~{self.validation_s:.2g} s each)"
            if self.validation_s > 0 else f"a checkpoint every {self.chunk_steps} steps (no validation cases)"
        )
        spent = f"; {format_duration(resumed_after_s)} of it already spent" if resumed_after_s > 0 else ""
        return (
            f"budget {format_duration(self.budget_s)}: {self.total_steps} steps of batch {batch_size}, "
            f"~{self.step_s:.2g} s/step, {val}, {self.reserve_s:.0f} s kept for the final model write{spent}"
        )


def reserve_seconds(budget_s: float) -> float:
    """Time kept at the end of a fold for writing the model folder and the last checkpoint."""
    return max(RESERVE_MIN_S, RESERVE_SHARE * budget_s)


def plan_budget(
    budget_s: float,
    *,
    step_s: float,
    validation_s: float,
    spent_s: float = 0.0,
    steps_done: int = 0,
    validations_done: int = 0,
    validations: int | None = None,
    chunk_steps: int | None = None,
    has_validation: bool = True,
    min_steps: int = MIN_STEPS,
) -> BudgetPlan:
    """Split what is left of a budget between optimizer steps and validations.

    Args:
        budget_s: the fold's whole budget.
        step_s: seconds per optimizer step (measured, data loading included).
        validation_s: seconds per validation pass over the validation cases.
        spent_s: seconds already spent on this fold (resume, or re-sizing mid-run).
        steps_done: optimizer steps already taken.
        validations_done: validation passes already run.
        validations: validation passes of the whole fold (default: as many as
            ``VALIDATION_SHARE`` of the budget allows, 1 to ``MAX_VALIDATIONS``).
        chunk_steps: keep this many steps between validations (re-sizing keeps the cadence).
        has_validation: whether the fold has validation cases.
        min_steps: below this many steps in all, training is refused.

    Raises:
        TrainingError: the budget leaves fewer than ``min_steps`` steps; the message gives
            the smallest budget that would do.
    """
    step_s = max(float(step_s), 1e-6)
    validation_s = float(validation_s) if has_validation else 0.0
    reserve = reserve_seconds(budget_s)
    if validations is None:
        if validation_s > 0:
            validations = int(min(MAX_VALIDATIONS, max(1, (VALIDATION_SHARE * budget_s) // validation_s)))
        else:
            validations = MAX_VALIDATIONS
    validations_left = max(1 if validation_s > 0 else 0, validations - validations_done)
    usable = budget_s - spent_s - reserve - validation_s * validations_left
    total = steps_done + int(max(0.0, usable) // step_s)
    if total < min_steps:
        needed = min_steps * step_s + validation_s
        needed += reserve_seconds(needed) + spent_s
        raise TrainingError(
            f"the time budget {format_duration(budget_s)} leaves room for only {total} training steps "
            f"(~{step_s:.2g} s per step measured on this machine"
            + (f", ~{validation_s:.0f} s per validation" if validation_s else "")
            + f"); at least {min_steps} steps are needed to learn anything. Give --time-budget "
            f"{format_duration(math.ceil(needed / 60) * 60 if needed > 60 else math.ceil(needed))} or more, "
            "or a smaller configuration (e.g. --spatial-dims 2)."
        )
    chunk = int(chunk_steps) if chunk_steps else max(1, total // max(1, validations))
    chunks = max(math.ceil(steps_done / chunk), total // chunk, 1)
    return BudgetPlan(
        budget_s=float(budget_s),
        spent_s=float(spent_s),
        step_s=step_s,
        validation_s=validation_s,
        total_steps=int(chunks * chunk),
        chunk_steps=chunk,
        chunks=int(chunks),
        reserve_s=reserve,
    )


# --------------------------------------------------------------------------- choosing 3D or 2.5D


@dataclass(frozen=True)
class Choice:
    """The configuration a budget affords: ``spatial_dims``, ``slice_context`` and the reason (for plan.json)."""

    spatial_dims: int
    slice_context: int
    reason: str


def choose_configuration(budget_s: float, *, step_s_3d: float, step_s_2d: float, slice_context: int = 1) -> Choice:
    """3D when the budget gives the 3D network enough steps, else 2.5D (2D slices with neighbours as channels).

    The rule: nnU-Net trains 1000 epochs of 250 steps; its shortened schedules stay close
    to that down to about 40 epochs (10,000 steps) and lose accuracy quickly below. A 3D
    U-Net that gets fewer than ``MIN_STEPS_3D`` steps in the budget is therefore replaced
    by the 2D network on slices of the same grid, which costs far less per step (on a
    2-core CPU 5-20x less), sees every slice of every case many times within the budget,
    and gets its through-plane context from ``slice_context`` neighbouring slices on each
    side stacked as input channels. Both step times are measured on this machine
    (:func:`time_training_step`).
    """
    usable = budget_s * (1.0 - VALIDATION_SHARE - RESERVE_SHARE)
    steps_3d = int(usable // max(step_s_3d, 1e-6))
    steps_2d = int(usable // max(step_s_2d, 1e-6))
    measured = f"measured {step_s_3d:.2g} s/step in 3D, {step_s_2d:.2g} s/step in 2D"
    if steps_3d >= MIN_STEPS_3D:
        return Choice(3, 0, f"3D: the budget {format_duration(budget_s)} gives the 3D network ~{steps_3d} steps "
                            f"(>= {MIN_STEPS_3D}; {measured})")
    return Choice(
        2, slice_context,
        f"2.5D ({2 * slice_context + 1} slices as channels): the budget {format_duration(budget_s)} gives the 3D "
        f"network only ~{steps_3d} steps (< {MIN_STEPS_3D}) and the 2D network ~{steps_2d} ({measured})",
    )


def time_training_step(model, loss_fn, *, batch_size: int, in_channels: int, patch_size, num_classes: int,
                       device, steps: int = 3, warmup: int = 1) -> float:
    """Median seconds of one SGD step (forward, backward, update) of ``model`` on random tensors of the plan's shape.

    The network's compute only (no data loading), which dominates on a CPU; the model is a
    throw-away copy built for the measurement.
    """
    import time

    import numpy as np
    import torch

    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, in_channels, *patch_size), generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size, 1, *patch_size), generator=g).to(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))
