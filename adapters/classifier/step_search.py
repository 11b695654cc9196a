"""The search for IAU's step size: the smallest lr in [lr_min, lr_max] at which a margin (criteria.Margin, read
at a trial step of that lr) is at most 0, i.e. the forget rows look unseen. Each trial costs a forward pass over
the forget rows, so the searches count them: `bisection` for a margin that moves in steps, `interpolated` for one
that moves smoothly, to the same precision in fewer trials.

Both return (the lr found, None if no trial reached it; the trials that fell short, ascending): every trial that
fell short lies below every one that reached, which the caller's guard search relies on."""

from __future__ import annotations

import math
from collections.abc import Callable


def bisection(margin_at: Callable[[float], float], at_zero: float, lr_min: float, lr_max: float, steps: int
              ) -> tuple[float | None, list[float]]:
    """The smallest lr in [lr_min, lr_max] at which `margin_at` is at most 0, by `steps` bisection steps on log lr
    (within a factor (lr_max / lr_min) ** 2**-steps): (that lr, None if no trial reached it; the trials that fell
    short, ascending). For a margin that moves in steps (an accuracy), where interpolating it says little."""
    lo, hi = math.log(lr_min), math.log(lr_max)
    reached_at, short = None, []
    for _ in range(steps):
        lr = math.exp((lo + hi) / 2)
        if margin_at(lr) <= 0:
            hi, reached_at = math.log(lr), lr
        else:
            lo = math.log(lr)
            short.append(lr)  # every trial that fell short lies below every one that reached the criterion
    return reached_at, short


def interpolated(margin_at: Callable[[float], float], at_zero: float, lr_min: float, lr_max: float, steps: int
                 ) -> tuple[float | None, list[float]]:
    """What `bisection` finds, to the same precision, for a margin that moves smoothly with lr (a mean confidence
    or loss), in fewer trials: a trial costs a forward pass over the forget rows.

    Each trial goes where the margin, interpolated through the last three trials (the unchanged weights, margin
    `at_zero`, count as one), crosses 0 inside the bracket (`crossing`). A trial lands at least half the final
    precision inside the bracket (on log lr), so one at the crossing is confirmed by the next; where two trials
    did not halve the bracket, the next is a bisection step, so a strongly curved margin costs at most about
    twice the bisection's trials."""
    lo, hi = math.log(lr_min), math.log(lr_max)
    resolution = (hi - lo) / 2**steps  # the bisection's final bracket
    points = [(0.0, at_zero)]  # (lr, margin) of every trial, in order
    short_at, reached_at = (0.0, at_zero), None  # the bracket's ends: (lr, margin) of the last trial on each side
    widths, bisected, confirming = [hi - lo], False, False
    while hi - lo > resolution:
        estimate = crossing(points, short_at, reached_at) if len(points) > 1 else math.nan  # nan: bisect
        at = (lo + hi) / 2 if math.isnan(estimate) else math.log(estimate) if estimate > 0 else lo
        edges = (lo + resolution / 2, hi - resolution / 2)
        at = min(max(at, edges[0]), edges[1])
        stalled = len(widths) >= 3 and widths[-1] > widths[-3] / 2 and not bisected
        if at in edges and not confirming:  # the crossing is at an end: the trial just inside it closes the bracket
            confirming, bisected = True, False
        elif stalled:
            at, bisected, confirming = (lo + hi) / 2, True, False
        else:
            bisected = confirming = False
        lr = math.exp(at)
        margin = margin_at(lr)
        points.append((lr, margin))
        if margin <= 0:
            hi, reached_at = at, (lr, margin)
        else:
            lo, short_at = at, (lr, margin)
        widths.append(hi - lo)
    return (reached_at[0] if reached_at else None), [lr for lr, m in points[1:] if m > 0]


def crossing(points: list[tuple[float, float]], short_at: tuple[float, float],
             reached_at: tuple[float, float] | None) -> float:
    """Where the margin crosses 0, from its (lr, margin) points: on the line between the bracket's ends (before a
    trial reaches the criterion, the line through the last two points, all short of it), or, where the parabola
    through the last three points crosses inside the bracket, there (the crossing nearest the line's)."""
    if reached_at is not None:
        (x0, y0), (x1, y1) = short_at, reached_at
    else:
        (x0, y0), (x1, y1) = points[-2:]
    estimate = x1 - y1 * (x1 - x0) / (y1 - y0) if y1 != y0 else math.inf
    if len(points) < 3:
        return estimate
    (xa, ya), (xb, yb), (xc, yc) = points[-3:]
    # the parabola y = a x^2 + b x + c through the three points, from divided differences
    dab, dbc = (yb - ya) / (xb - xa), (yc - yb) / (xc - xb)
    a = (dbc - dab) / (xc - xa)
    b, c = dab - a * (xa + xb), ya - dab * xa + a * xa * xb
    upper = reached_at[0] if reached_at is not None else math.inf
    if a == 0 or b * b < 4 * a * c:
        return estimate
    root = math.sqrt(b * b - 4 * a * c)
    inside = [x for x in ((-b - root) / (2 * a), (-b + root) / (2 * a)) if short_at[0] < x < upper]
    return min(inside, key=lambda x: abs(x - estimate)) if inside else estimate


def largest_within(acc_at: Callable[[float], float], at_zero: float, floor: float, lo: float, outside: float,
                   at_outside: float, ratio: float) -> float:
    """The largest lr in [lo, outside) whose accuracy `acc_at(lr)` is at least `floor`, to within a factor
    `ratio`: the unchanged weights score `at_zero` (at least `floor`), a step of `outside` scores `at_outside`
    (below it), and a step of `lo`, the smallest searched, is taken as within (it is returned if no trial is).

    The accuracy a step costs grows about as a power of its size (a trained model sits at a minimum of its loss,
    which rises about quadratically), so each trial goes where the power law through the two trials that cost
    something nearest the floor reaches it (through one, with exponent 2, until there are two). An estimate
    within `ratio` of an end of the bracket puts the trial that far from it, so that it closes the bracket either
    way; after two trials on the same side the next goes past the estimate, twice as far after each more, so as
    not to creep up on the edge from one side; once a trial has been within, where three trials did not halve the
    bracket (on log lr), the next is a bisection step."""
    costs = [(outside, at_zero - at_outside)]  # (lr, accuracy lost) of every trial that lost some
    hi, allowed = outside, at_zero - floor
    within: list[bool] = []  # each trial's side of the edge
    widths = [math.log(hi / lo)]
    while hi / lo > ratio:
        (x0, c0), (x1, c1) = sorted(costs, key=lambda point: abs(point[1] - allowed))[:2] if len(costs) > 1 \
            else ((0.0, 0.0), costs[0])
        power = min(max(math.log(c1 / c0) / math.log(x1 / x0), 0.5), 4.0) if x0 > 0 and x0 != x1 and c0 != c1 \
            else 2.0
        at = math.log(x1) + math.log(allowed / c1) / power if allowed > 0 else -math.inf
        low, high, close = math.log(lo), math.log(hi), 0.999 * math.log(ratio)
        run = next((i for i, side in enumerate(reversed(within)) if side != within[-1]), len(within))
        if run >= 2:  # creeping up on the edge from one side: aim past the estimate, twice as far each time
            at += (close if within[-1] else -close) * 2.0 ** (run - 3)
        if True in within and len(widths) >= 4 and widths[-1] > widths[-4] / 2:
            at = (low + high) / 2
        else:
            at = min(max(at, low + close), high - close)  # near an end: the trial that closes the bracket
        lr = math.exp(at)
        accuracy = acc_at(lr)
        if at_zero - accuracy > 0:
            costs.append((lr, at_zero - accuracy))
        within.append(accuracy >= floor)
        if within[-1]:
            lo = lr
        else:
            hi = lr
        widths.append(math.log(hi / lo))
    return lo
