"""Choosing the home (preferred) relay region with hysteresis (nat-traversal §2.3), sans-io.

Every report's region latencies go into a :class:`LatencyHistory` covering the last 5 min + 5 s
(so it always includes a full report). :func:`choose_home` then picks the region with the best
latency over that history, among regions that answered in the current report, scaled by the
map's ``RegionScore``; but the current home stays while it is still reachable unless the
candidate is both at least 10 ms faster and at least a third faster. Times are the caller's
(monotonic) clock, passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping
from typing import Final

__all__ = [
    "HISTORY_WINDOW",
    "HOME_KEEP_RATIO",
    "HOME_MIN_IMPROVEMENT",
    "HOME_REACHABLE_FRAME_AGE",
    "NO_DATA_KEEP_AGE",
    "LatencyHistory",
    "choose_home",
]

HISTORY_WINDOW: Final = 5 * 60.0 + 5.0
HOME_MIN_IMPROVEMENT: Final = 0.010
"""A new home must be at least this many seconds faster..."""
HOME_KEEP_RATIO: Final = 2 / 3
"""...and at most this fraction of the old home's latency."""
HOME_REACHABLE_FRAME_AGE: Final = 8.0
"""The old home counts as reachable if a DERP frame came from it this recently (seconds)."""
NO_DATA_KEEP_AGE: Final = 2 * 60.0
"""With no latency data at all, keep the old home if it was heard from this recently (2 × keepalive)."""


class LatencyHistory:
    """Region latencies of recent reports, pruned to :data:`HISTORY_WINDOW`."""

    def __init__(self, window: float = HISTORY_WINDOW) -> None:
        self.window = window
        self._entries: deque[tuple[float, dict[int, float]]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, now: float, latencies: Mapping[int, float]) -> None:
        """Record a report's per-region latencies taken at ``now``, dropping entries too old."""
        self._entries.append((now, dict(latencies)))
        self.prune(now)

    def prune(self, now: float) -> None:
        while self._entries and now - self._entries[0][0] > self.window:
            self._entries.popleft()

    def best(self) -> dict[int, float]:
        """The lowest latency seen per region across the kept reports."""
        out: dict[int, float] = {}
        for _, latencies in self._entries:
            for region_id, latency in latencies.items():
                out[region_id] = min(latency, out.get(region_id, latency))
        return out


def choose_home(
    *,
    now: float,
    current: Mapping[int, float],
    best_recent: Mapping[int, float],
    previous_home: int = 0,
    region_score: Mapping[int, float] | None = None,
    last_heard_from_home: float | None = None,
    forced_region: int = 0,
    never_home: Collection[int] = (),
) -> int:
    """The home region for a report; 0 when there is none.

    ``current`` holds this report's latencies (only these regions can become home);
    ``best_recent`` the history's best (:meth:`LatencyHistory.best`, including this report).
    ``last_heard_from_home`` is when a DERP frame last arrived from ``previous_home``.
    ``forced_region`` wins whenever it is reachable; ``never_home`` regions (``Avoid``,
    ``NoMeasureNoHome``) are never chosen.
    """
    scores = region_score or {}
    heard_recently = (
        last_heard_from_home is not None and now - last_heard_from_home <= HOME_REACHABLE_FRAME_AGE
    )

    def reachable(region_id: int) -> bool:
        return region_id in current or (region_id == previous_home and heard_recently)

    if forced_region and reachable(forced_region):
        return forced_region
    if not current:
        if (
            previous_home
            and last_heard_from_home is not None
            and now - last_heard_from_home <= NO_DATA_KEEP_AGE
        ):
            return previous_home
        return 0

    def scored(region_id: int, latency: float) -> float:
        return latency * scores.get(region_id, 1.0)

    candidates = [r for r in current if r not in never_home]
    if not candidates:
        return previous_home if previous_home and reachable(previous_home) else 0
    candidate = min(candidates, key=lambda r: (scored(r, best_recent.get(r, current[r])), r))
    if not previous_home or previous_home == candidate or not reachable(previous_home):
        return candidate
    if previous_home in never_home:
        return candidate
    candidate_latency = scored(candidate, best_recent.get(candidate, current[candidate]))
    old = current.get(previous_home, best_recent.get(previous_home))
    if old is None:
        return previous_home  # reachable only by its DERP frames: no number says it is worse
    old_latency = scored(previous_home, old)
    if (
        candidate_latency > old_latency - HOME_MIN_IMPROVEMENT
        or candidate_latency > old_latency * HOME_KEEP_RATIO
    ):
        return previous_home
    return candidate
