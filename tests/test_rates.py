"""How decode speeds are compared (`edgelora.runtime.engine.paired_ratio`, `median_interval`): the
figures the benchmarks quote for an adapter's cost, checked on synthetic timings whose true ratio is
known."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.errors import EdgeloraError
from edgelora.runtime.engine import median_interval, paired_ratio


def test_median_interval_is_the_textbook_order_statistics():
    # n = 100 at 95%: the 40th and 61st smallest (the binomial tables' values); tiny n: min to max
    assert median_interval(range(1, 101)) == (50.5, 40.0, 61.0)
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    with pytest.raises(EdgeloraError):
        median_interval([])


@pytest.mark.parametrize("n", [15, 40, 120])
def test_median_interval_covers_the_true_median_as_often_as_it_says(n):
    rng = np.random.default_rng(n)
    trials = 4000
    # a skewed distribution whose median is known: lognormal(0, 0.5) has median exactly 1
    hits = sum(lo <= 1.0 <= hi for _, lo, hi in (median_interval(rng.lognormal(0, 0.5, n)) for _ in range(trials)))
    assert 0.95 <= hits / trials <= 0.99  # order statistics are conservative, never under the level


def drifting_blocks(ratios: dict[str, float], cycles: int, drift, answers: int = 3) -> list[tuple[str, float, int]]:
    """Blocks in turn (base, then the others) on a machine whose speed drifts: a block of setting k
    takes drift(i) / ratio_k seconds a token, i its place in the run."""
    out, i = [], 0
    for c in range(cycles):
        for label, r in ratios.items():
            out.append((label, drift(i) / r, c * answers // cycles))
            i += 1
    return out


def test_paired_ratio_cancels_the_machines_drift():
    truth = {"base": 1.0, "one": 0.95, "two": 0.91}
    slowing = drifting_blocks(truth, 60, lambda i: 10e-3 * (1 + 0.004 * i))  # the machine slows by half over the run
    for label in ("one", "two"):
        ratio, lo, hi = paired_ratio(slowing, label, "base")
        assert ratio == pytest.approx(truth[label], rel=1e-9) and lo <= ratio <= hi
    # a machine whose speed wanders (a random walk of 2% a block, the run's blocks spread over a
    # third of its speed) with 1% noise on each block: the interval still holds the true ratio and is
    # narrow, where the blocks' own times spread far wider than the adapter's cost
    rng = np.random.default_rng(0)
    walk = np.exp(np.cumsum(rng.normal(0, 0.02, 180)))
    noisy = [(lb, s * rng.lognormal(0, 0.01), a) for lb, s, a in drifting_blocks(truth, 60, lambda i: 10e-3 * walk[i])]
    assert np.ptp(np.log([s for lb, s, _ in noisy if lb == "base"])) > 0.3
    for label in ("one", "two"):
        ratio, lo, hi = paired_ratio(noisy, label, "base")
        assert lo <= truth[label] <= hi and hi - lo < 0.02


def test_paired_ratio_pairs_only_within_an_answer():
    # each answer: a new prompt, so a block is never paired across answers (the first context differs)
    blocks = [("base", 1.0, 1), ("one", 2.0, 1), ("one", 4.0, 2), ("base", 3.0, 2)]
    assert paired_ratio(blocks, "one", "base") == (0.625, 0.5, 0.75)  # 1/2 and 3/4, each with its own answer's base
    assert paired_ratio([("one", 1.0, 1)], "one", "base") is None
