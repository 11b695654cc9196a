"""IAU's step search (adapters/classifier/step_search.py): on margins shaped like a criterion's, the interpolated
search finds the step the bisection does, to its precision, in fewer trials, and never in many more."""

import math

import pytest

from adapters.classifier import step_search
from adapters.classifier.iau import GUARD_PRECISION, IAUConfig


def _margins():
    """Smooth margins falling with lr as a criterion's does, crossing 0 across the whole default range:
    (name, margin, root)."""
    for root in (2e-5, 1.7e-4, 6e-4, 3.1e-3, 9e-3):
        yield f"linear@{root:g}", (lambda lr, r=root: 0.05 * (1 - lr / r)), root
        yield f"concave@{root:g}", (lambda lr, r=root: 0.05 * (1 - (lr / r) ** 2)), root  # as measured: it steepens
        yield f"convex@{root:g}", (lambda lr, r=root: math.exp(-lr / r * 3) - math.exp(-3)), root
        yield f"logistic@{root:g}", (lambda lr, r=root: 1 / (1 + (lr / r) ** 4) - 0.5), root


@pytest.mark.parametrize("name, margin, root", list(_margins()), ids=[m[0] for m in _margins()])
def test_the_interpolated_search_finds_what_the_bisection_does_to_its_precision(name, margin, root):

    lr_min, lr_max, steps = IAUConfig.lr_min, IAUConfig.lr_max, IAUConfig.calibration_steps
    precision = math.exp(math.log(lr_max / lr_min) / 2 ** steps)
    trials: list[float] = []

    def counted(lr: float) -> float:
        trials.append(lr)
        return margin(lr)

    found, short = step_search.interpolated(counted, margin(0.0), lr_min, lr_max, steps)
    bisected, _ = step_search.bisection(margin, margin(0.0), lr_min, lr_max, steps)
    assert found is not None and bisected is not None
    assert margin(found) <= 0 and root <= found <= root * precision  # the smallest step that reaches it, as close
    assert short == sorted(short) and all(margin(lr) > 0 for lr in short) and max(short, default=0) < root
    assert all(lr_min <= lr <= lr_max for lr in trials)
    assert len(trials) <= 2 * steps


def test_the_interpolated_search_takes_fewer_trials_on_margins_shaped_as_measured():
    # the forget rows' mean confidence along IAU's direction is nearly linear in lr, its slope steepening by about
    # half up to the crossing (digits and MNIST, MLP and CNN); the strongly curved margins above stay within 2x
    counts = []
    for root in (2e-5, 1.7e-4, 6e-4, 3.1e-3, 9e-3):
        calls: list[float] = []

        def margin(lr: float, r: float = root) -> float:
            return 0.04 * (1 - lr / r * (0.7 + 0.3 * lr / r))

        def counted(lr: float, calls: list[float] = calls, margin=margin) -> float:
            calls.append(lr)
            return margin(lr)

        found, _ = step_search.interpolated(counted, margin(0.0), IAUConfig.lr_min, IAUConfig.lr_max,
                                        IAUConfig.calibration_steps)
        assert found is not None and margin(found) <= 0
        counts.append(len(calls))
    assert max(counts) <= 4 < IAUConfig.calibration_steps, counts


def test_the_interpolated_search_survives_a_margin_that_is_not_a_number():
    # a diverged trial (inf/nan logits) gives a nan margin: it counts as short of the criterion, never as a step
    found, short = step_search.interpolated(lambda lr: math.nan if lr > 1e-3 else 1.0 - lr / 1e-3, 1.0, 1e-5, 1e-2, 7)
    assert found is None and all(1e-5 <= lr <= 1e-2 for lr in short)


def test_the_interpolated_search_out_of_range():

    never, short = step_search.interpolated(lambda lr: 1.0 - lr, 1.0, 1e-5, 1e-2, 7)  # no step in range is enough
    assert never is None and short == sorted(short) and short[-1] >= 1e-2 / math.exp(math.log(1e3) / 2**7)
    always, short = step_search.interpolated(lambda lr: -1.0, 1.0, 1e-5, 1e-2, 7)  # the smallest step is enough
    assert always is not None and always <= 1e-5 * math.exp(math.log(1e3) / 2**7) and short == []


def _guard_curves():
    """Retain accuracies falling with lr as a step's cost does, read on a probe of 256 rows (so in steps of
    1/256) and no lower than chance: (name, accuracy, edge, outside), the floor 2 points below the unchanged
    weights' accuracy, `edge` where the accuracy reaches it and `outside` the step the search starts from."""
    for edge in (3e-5, 4e-4, 2.5e-3):
        for power in (1.0, 1.5, 2.0, 3.0):
            for beyond in (1.3, 3.0, 30.0):
                yield (f"power{power:g}@{edge:g}x{beyond:g}",
                       lambda lr, e=edge, p=power: max(math.floor((0.97 - 0.02 * (lr / e) ** p) * 256) / 256, 0.1),
                       edge, edge * beyond)
        # a cliff: nothing lost, then 30 points at once (a power law says nothing useful here)
        yield f"cliff@{edge:g}", lambda lr, e=edge: 0.97 if lr < e else 0.67, edge, edge * 3


@pytest.mark.parametrize("name, accuracy, edge, outside", list(_guard_curves()), ids=[c[0] for c in _guard_curves()])
def test_the_guard_search_finds_the_largest_step_within_the_guard_to_its_precision(name, accuracy, edge, outside):
    ratio, lr_min, floor = GUARD_PRECISION, IAUConfig.lr_min, 0.95
    trials: list[float] = []

    def counted(lr: float) -> float:
        trials.append(lr)
        return accuracy(lr)

    found = step_search.largest_within(counted, accuracy(0.0), floor, lr_min, outside, accuracy(outside), ratio)
    assert accuracy(found) >= floor and accuracy(found * ratio) < floor  # within it, and close to its edge
    assert all(lr_min < lr < outside for lr in trials)
    bisection = math.ceil(math.log2(math.log(outside / lr_min) / math.log(ratio)))
    if name.startswith("power") and outside <= 3 * edge:  # as measured: the criterion is reached a little beyond
        assert len(trials) <= bisection, trials
    else:
        assert len(trials) <= 2 * bisection, trials


def test_the_guard_search_takes_fewer_trials_than_a_bisection_where_the_cost_follows_a_power_law():
    ours, bisections = [], []
    for name, accuracy, edge, outside in _guard_curves():
        if name.startswith("power") and outside <= 3 * edge:
            trials: list[float] = []
            step_search.largest_within(lambda lr, a=accuracy, t=trials: t.append(lr) or a(lr), accuracy(0.0), 0.95,
                                       IAUConfig.lr_min, outside, accuracy(outside), GUARD_PRECISION)
            ours.append(len(trials))
            bisections.append(math.ceil(math.log2(math.log(outside / IAUConfig.lr_min) / math.log(GUARD_PRECISION))))
    assert sum(ours) / len(ours) <= 0.6 * sum(bisections) / len(bisections), (ours, bisections)


def test_the_guard_search_when_no_step_is_within_the_guard_takes_the_smallest():
    trials: list[float] = []
    found = step_search.largest_within(lambda lr: trials.append(lr) or 0.5, 0.97, 0.95, 1e-5, 1e-2, 0.5,
                                       GUARD_PRECISION)
    assert found == 1e-5 and len(trials) <= 2 * 6 and all(1e-5 < lr < 1e-2 for lr in trials)


def test_the_guard_search_with_no_accuracy_to_spare():
    # a floor at the unchanged weights' accuracy (a lineage that has spent its budget): any cost is too much
    found = step_search.largest_within(lambda lr: 0.97 if lr <= 2e-4 else 0.96, 0.97, 0.97, 1e-5, 1e-2, 0.9,
                                       GUARD_PRECISION)
    assert 2e-4 / GUARD_PRECISION <= found <= 2e-4
