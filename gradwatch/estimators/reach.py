"""Gradient reach: how many steps back the gradient signal survives, from the lag norms already measured.

The lecture's quantity: backpropagation multiplies dL/ds_T by the product of step Jacobians
ds_T/ds_{T-tau} on its way to the state tau steps back, so ||ds_T/ds_{T-tau}||_2 is (at most) the share of
the last step's gradient that arrives there. The **reach** is the lag at which that share first falls
below ``floor`` (default 1e-4, ``DetectionConfig.vanishing_lag_norm``): the longest lag whose product norm
stays at or above the floor. Between two measured lags (1, 2, 4, ..., T) the norm is interpolated
log-linearly in tau (a product of similar factors decays exponentially); lag 0 is the identity (norm 1).

- every measured lag at or above the floor: the reach is the longest measured lag (the whole sequence);
- a product that is 0 (underflowed, or dead ReLU units) ends the reach at the last lag above the floor;
- a lag norm that is missing, NaN or infinite (overflowed) before the first crossing: the reach cannot be
  measured (None), never a guess.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

DEFAULT_REACH_FLOOR = 1e-4
"""The share of the last step's gradient below which a contribution counts as lost (see the docstring)."""


def measured_lags(lag_norm: Mapping[str, float | None]) -> list[tuple[int, float | None]]:
    """(tau, norm) of the keys that name a positive lag, shortest first (other keys are ignored)."""
    return lags_of(lag_norm, lag_keys(tuple(lag_norm)))


def lag_keys(keys: Sequence[str]) -> list[tuple[str, int]]:
    """(key, tau) of the keys that name a positive lag, shortest first; of equal lags the first key wins.
    Depends on the keys only: a replay of many measurements parses each key set once."""
    taus: dict[int, str] = {}
    for key in keys:
        try:
            tau = int(key)
        except ValueError:
            continue
        if tau >= 1 and tau not in taus:
            taus[tau] = key
    return [(key, tau) for tau, key in sorted(taus.items())]


def lags_of(
    lag_norm: Mapping[str, float | None], keys: list[tuple[str, int]]
) -> list[tuple[int, float | None]]:
    """:func:`measured_lags` given the :func:`lag_keys` of ``lag_norm``'s keys."""
    return [(tau, None if (value := lag_norm[key]) is None else float(value)) for key, tau in keys]


def gradient_reach(lag_norm: Mapping[str, float | None], floor: float = DEFAULT_REACH_FLOOR) -> float | None:
    """The lag tau (in steps, >= 0) at which ||ds_T/ds_{T-tau}||_2 first falls below ``floor``.

    Log-linear interpolation between measured lags, starting from lag 0 (norm 1). None when there is no
    lag at all or a lag norm before the crossing is missing, NaN or infinite.
    """
    if not (isinstance(floor, (int, float)) and 0 < floor < 1):
        raise ValueError(f"floor must be a number in (0, 1), got {floor!r}")
    return reach_of(measured_lags(lag_norm), floor)


def reach_of(lags: Sequence[tuple[int, float | None]], floor: float) -> float | None:
    """:func:`gradient_reach` of the :func:`measured_lags` ``lags`` (``floor`` checked by the caller)."""
    if not lags:
        return None
    previous_tau, previous_norm = 0, 1.0
    for tau, norm in lags:
        if norm is None or not math.isfinite(norm):
            return None
        if norm >= floor:
            previous_tau, previous_norm = tau, norm
            continue
        if norm <= 0:
            return float(previous_tau)
        # log n(t) is linear between the two lags: solve log n(t) = log floor
        share = (math.log(previous_norm) - math.log(floor)) / (math.log(previous_norm) - math.log(norm))
        return previous_tau + (tau - previous_tau) * share
    return float(previous_tau)


def judged_horizon(declared: int | None, lag_norm: Mapping[str, float | None]) -> int | None:
    """The horizon a measurement is judged at: the declared one, at most the longest measured lag (the
    product cannot be measured beyond the sequences). None declared: T - 1 for a longest lag of T, the
    longest dependency a sequence of T steps holds (from its first input to its last output; lag T also
    multiplies by the Jacobian with respect to the initial state, which carries no input)."""
    return horizon_of(declared, measured_lags(lag_norm))


def horizon_of(declared: int | None, lags: Sequence[tuple[int, float | None]]) -> int | None:
    """:func:`judged_horizon` of the :func:`measured_lags` ``lags``."""
    if not lags:
        return None
    longest = lags[-1][0]
    return max(1, longest - 1) if declared is None else min(declared, longest)


def reach_at_horizon(lag_norm: Mapping[str, float | None], horizon: int, floor: float) -> float | None:
    """:func:`gradient_reach`, or None when it cannot say whether the gradient reaches ``horizon``: the
    product drops to exactly 0 at the first measured lag past the horizon (a dead ReLU step, for example
    at the first step of a zero initial state) after a lag above the floor, so the crossing lies somewhere
    between those two lags, unmeasured."""
    reach = gradient_reach(lag_norm, floor)
    if reach is None or reach >= horizon:
        return reach
    return reach_at_horizon_of(measured_lags(lag_norm), horizon, reach)


def reach_at_horizon_of(lags: Sequence[tuple[int, float | None]], horizon: int, reach: float) -> float | None:
    """:func:`reach_at_horizon` of the :func:`measured_lags` ``lags`` whose reach (below ``horizon``) is
    ``reach``."""
    beyond = next(((tau, norm) for tau, norm in lags if tau > reach), None)
    if beyond is not None and beyond[1] == 0 and beyond[0] > horizon and reach == int(reach):
        return None
    return reach


def product_norm_at(lag_norm: Mapping[str, float | None], tau: int) -> float | None:
    """||ds_T/ds_{T-tau}||_2 at a lag up to the longest measured one, log-linearly interpolated between the
    measured lags around it (lag 0: norm 1). 0 past a product that is 0 (a longer product contains it);
    None beyond the longest lag or next to a missing or non-finite norm."""
    points: list[tuple[int, float | None]] = [(0, 1.0), *measured_lags(lag_norm)]
    for (lag_before, before), (lag_after, after) in itertools.pairwise(points):
        if lag_after < tau:
            continue
        if after is None or not math.isfinite(after):
            return None
        if lag_after == tau:
            return after
        if before is None or not math.isfinite(before):
            return None
        if before == 0:
            return 0.0
        if after == 0:
            return None
        share = (tau - lag_before) / (lag_after - lag_before)
        return math.exp((1 - share) * math.log(before) + share * math.log(after))
    return None
