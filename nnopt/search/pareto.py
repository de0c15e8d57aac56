"""The Pareto front of (quality, cost) and the choice within an accuracy budget.

Quality is higher-is-better (accuracy, cosine); cost is lower-is-better (bytes, ms, nJ). A point
is on the front when no other point is at least as good in both and strictly better in one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
TOLERANCE = 1e-12  # a drop equal to the budget meets it, whatever the float rounding


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` = (quality, cost) is at least as good as ``b`` in both and better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(items: Sequence[T], quality: Callable[[T], float], cost: Callable[[T], float]) -> list[T]:
    """The non-dominated items, cheapest first; of identical points the first is kept.

    >>> pareto_front([(0.9, 5), (0.95, 8), (0.9, 9)], lambda p: p[0], lambda p: p[1])
    [(0.9, 5), (0.95, 8)]
    """
    points = [(quality(item), cost(item)) for item in items]
    front = []
    for i, item in enumerate(items):
        beaten = any(dominates(points[j], points[i]) or (points[j] == points[i] and j < i) for j in range(len(items)))
        if not beaten:
            front.append((points[i][1], -points[i][0], i, item))
    return [item for *_, item in sorted(front, key=lambda entry: entry[:3])]


def meets(quality: float, baseline: float, max_drop: float) -> bool:
    """Whether a plan's quality is within ``max_drop`` of the baseline's."""
    return baseline - quality <= max_drop + TOLERANCE


def choose(front: Sequence[T], quality: Callable[[T], float], cost: Callable[[T], float], baseline: float,
           max_drop: float) -> T | None:
    """The cheapest item within the budget (ties: the more accurate); None when none meets it."""
    within = [item for item in front if meets(quality(item), baseline, max_drop)]
    return min(within, key=lambda item: (cost(item), -quality(item))) if within else None


def closest(items: Sequence[T], quality: Callable[[T], float], cost: Callable[[T], float], count: int = 3) -> list[T]:
    """The ``count`` most accurate items (cheapest first among equals): what comes nearest a budget none met."""
    return sorted(items, key=lambda item: (-quality(item), cost(item)))[:count]
