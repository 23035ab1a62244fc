"""Where each GISP gradient step cuts to: fixed schedules, and an adaptive one that reads the loss.

A schedule answers one question: after gradient pass ``step`` (of ``steps``), to which parameter
sparsity does it cut? Pass ``i`` runs on the model left by pass ``i - 1``; its scores cut from the
previous end to the new one, and every requested target in between is cut from the same scores, so
each target is hit (to within one structure) whatever the schedule. The last pass always ends at the
largest target. Ends only grow, so the subnetworks are nested.

Fixed schedules (``t = (step + 1) / steps``, ``top`` the largest target):

- ``linear`` (default): ``top * t``.
- ``cosine``: ``top * (1 - cos(pi * t)) / 2``: small steps at both ends, large ones in the middle.
- ``exponential``: ``top * (1 - exp(-alpha * t)) / (1 - exp(-alpha))``: with ``alpha > 0`` large steps
  first and small ones near the top (the reference's ``exp_shape=concave``), with ``alpha < 0`` the
  reverse (its ``convex``).

The reference (``pruners/non_uniform_pruner.py``, ``ratio_scheduling``) has the same three curves
over the fraction of *structures*, sampled at ``k / (n - 1)`` for ``k = 0 .. n - 1``: its first pass
prunes nothing, and its ``exp_alpha`` is per step (``alpha`` here is per schedule: the reference's
``exp_alpha=0.3`` over 112 steps is ``alpha ~ 33.6``). Its concave curve never reaches the top ratio
(it divides by ``1 - exp(-alpha * n)``); ours ends at the top.

``adaptive`` (the paper's open question 4: can the schedule follow the loss?). Every pass already
measures the calibration loss of the model it runs on, so after pass ``i`` we know the loss at each
sparsity reached so far. The rule plans the remaining passes so that each is expected to raise the
loss by the same amount, and takes the first of them:

1. The slope of the loss over the last two intervals, ``k1`` (older) and ``k2`` (newer), gives an
   exponential rate of change ``b = ln(k2 / k1) / (distance between the intervals' midpoints)``.
   With fewer than three points, ``b = 0``.
2. With the loss modelled as ``L(s) ~ L_i + k2 * (exp(b * (s - s_i)) - 1) / b``, the ``m`` remaining
   passes raise it equally when ``exp(b * (end - start))`` steps linearly, so the next end is
   ``start + ln(1 + (exp(b * R) - 1) / m) / b``, ``R = top - start`` (``b = 0``: ``R / m``, linear).
   A loss that rises faster and faster (``b > 0``) gives a large step now and smaller ones later; a
   loss whose rise slows down gives the reverse. A slope that is not positive (the loss did not rise)
   takes the largest step allowed.
3. The step is kept within ``[R / (m * limit), R * limit / m]`` (``adaptive_limit``, default 2) and
   leaves each later pass at least ``R / (m * limit)``, so no pass is wasted and none jumps too far.

The number of gradient passes is ``steps``, as for every schedule. The rule reads only the recorded
history (sparsity and loss of each pass), so a resumed run recomputes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("linear", "cosine", "exponential", "adaptive")


@dataclass(frozen=True)
class Cut:
    """One pruning decision: cut to ``sparsity`` with the scores of gradient step ``step``."""

    step: int
    sparsity: float
    target: float | None  # the user's target when this cut is one


@dataclass(frozen=True)
class Schedule:
    """A schedule of ``steps`` gradient passes to ``top`` (see the module docstring for ``name``)."""

    name: str
    steps: int
    top: float
    alpha: float = 3.0
    limit: float = 2.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule={self.name!r} is not one of {', '.join(SCHEDULES)}")
        if self.name == "exponential" and self.alpha == 0:
            raise ValueError("exp_alpha=0 is the linear schedule; give a non-zero alpha or schedule=linear")
        if self.limit < 1:
            raise ValueError(f"adaptive_limit={self.limit} must be >= 1 (1 is the linear schedule)")

    @property
    def fixed(self) -> bool:
        """Whether every end is known before the run (all schedules but ``adaptive``)."""
        return self.name != "adaptive"

    def end(self, step: int, start: float, history: list[tuple[float, float]]) -> float:
        """The sparsity pass ``step`` cuts to, from ``start`` (the previous end); ``history`` holds
        ``(sparsity, loss)`` of every pass so far, this one included (read by ``adaptive`` only)."""
        if step == self.steps - 1:
            return self.top
        t = (step + 1) / self.steps
        if self.name == "linear":
            return self.top * (step + 1) / self.steps
        if self.name == "cosine":
            return self.top * 0.5 * (1.0 - math.cos(math.pi * t))
        if self.name == "exponential":
            return self.top * math.expm1(-self.alpha * t) / math.expm1(-self.alpha)
        return adaptive_end(history, start, self.top, self.steps - step, self.limit)


def adaptive_end(history: list[tuple[float, float]], start: float, top: float, remaining: int, limit: float) -> float:
    """The next end of the adaptive schedule: ``remaining`` passes (this one included) left to ``top``."""
    room = top - start
    even = room / remaining
    rate = loss_rate(history)
    if rate is None:  # the loss did not rise: go as far as allowed
        step = even * limit
    elif abs(rate * room) < 1e-9:
        step = even
    else:
        step = math.log1p(math.expm1(rate * room) / remaining) / rate
    smallest = even / limit
    step = min(max(step, smallest), even * limit, room - (remaining - 1) * smallest)
    return start + step


def loss_rate(history: list[tuple[float, float]]) -> float | None:
    """Exponential rate ``b`` of the loss slope over the last two intervals (0 with fewer than three
    points); ``None`` when the loss has not been rising over both (``b`` is then effectively infinite
    or undefined, and the rule takes its largest step)."""
    if len(history) < 2:
        return 0.0
    (s1, l1), (s2, l2) = history[-2:]
    newer = (l2 - l1) / (s2 - s1) if s2 > s1 else 0.0
    if newer <= 0:
        return None
    if len(history) < 3:
        return 0.0
    s0, l0 = history[-3]
    older = (l1 - l0) / (s1 - s0) if s1 > s0 else 0.0
    if older <= 0:
        return None
    return math.log(newer / older) / ((s2 - s0) / 2)


def step_cuts(step: int, start: float, end: float, targets: tuple[float, ...]) -> list[Cut]:
    """The cuts of one pass: every target in ``(start, end]``, then ``end`` itself unless it is one."""
    inside = sorted(t for t in targets if start + 1e-12 < t <= end + 1e-12)
    cuts = [Cut(step, t, t) for t in inside]
    if not inside or abs(inside[-1] - end) > 1e-12:
        cuts.append(Cut(step, end, None))
    return cuts
