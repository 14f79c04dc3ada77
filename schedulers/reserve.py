"""The free-block reserve that proactive policies keep for arriving jobs, sized from arrival bursts.

FastServe keeps some device blocks free so that a newly arrived high-priority job can start its prefill at
the next iteration instead of waiting for an offload. The public artifact keeps a fixed ``max_batch_size``
blocks; the paper sizes the reserve from the history of arrival bursts. ``BurstReserve`` implements the
latter: the reserve is the largest number of prompt blocks that arrived within any ``window`` seconds during
the last ``history`` seconds, never below a fixed ``floor`` and never above ``cap``.

Cost: ``record`` is amortised O(1) and ``blocks`` is amortised O(1): arrivals inside the current window live
in one deque (their running sum is the burst ending now), and each arrival's burst enters a monotonic deque
that yields the maximum over the history window.
"""

from __future__ import annotations

from collections import deque


class BurstReserve:
    def __init__(self, window: float, history: float, floor: int, cap: int) -> None:
        if not window > 0:
            raise ValueError(f"BurstReserve: window must be > 0 seconds, got {window!r}")
        if not history >= window:
            raise ValueError(f"BurstReserve: history ({history!r} s) must be >= window ({window!r} s)")
        self.window = window
        self.history = history
        self.floor = floor
        self.cap = max(cap, floor)
        self._recent: deque[tuple[float, int]] = deque()  # (arrival time, prompt blocks) within one window
        self._recent_sum = 0
        self._peaks: deque[tuple[float, int]] = deque()  # (time, burst ending then), bursts decreasing

    def record(self, now: float, blocks: int) -> None:
        """An admitted job arrived at ``now`` whose prompt needs ``blocks`` device blocks."""
        self._recent.append((now, blocks))
        self._recent_sum += blocks
        # Compare ages, not ``t <= now - window``: at large clocks ``now - window`` can round to ``now`` and
        # would drop the arrival just recorded.
        while now - self._recent[0][0] >= self.window:
            self._recent_sum -= self._recent.popleft()[1]
        burst = self._recent_sum
        while self._peaks and self._peaks[-1][1] <= burst:
            self._peaks.pop()
        self._peaks.append((now, burst))

    def blocks(self, now: float) -> int:
        """Device blocks to keep free at ``now``."""
        while self._peaks and now - self._peaks[0][0] > self.history:
            self._peaks.popleft()
        peak = self._peaks[0][1] if self._peaks else 0
        return min(max(self.floor, peak), self.cap)
