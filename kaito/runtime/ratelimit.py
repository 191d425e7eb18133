"""Rate limiters for the work queue, with client-go's semantics (``util/workqueue/default_rate_limiters.go``).

A rate limiter answers "how long should this item wait before it is handed out again?" (``when``),
forgets an item's failure history (``forget``) and reports how often an item was retried
(``num_requeues``). The default controller limiter is the maximum of a per-item exponential backoff
(5 ms doubling up to 1000 s) and an overall token bucket (10 qps, burst 100).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

Clock = Callable[[], float]


class RateLimiter(Protocol):
    """What the rate-limiting work queue needs from a limiter."""

    def when(self, item: Hashable) -> float:
        """Return the delay in seconds before ``item`` may be processed again (counts a failure)."""
        ...

    def forget(self, item: Hashable) -> None:
        """Drop the failure history of ``item``."""
        ...

    def num_requeues(self, item: Hashable) -> int:
        """Return how many times ``item`` was rate limited since it was last forgotten."""
        ...


class ItemExponentialFailureRateLimiter:
    """Per-item exponential backoff: ``base * 2**failures``, capped at ``max_delay``.

    Every call to :meth:`when` counts one more failure for the item, as in client-go.
    """

    def __init__(self, base_delay: float = 0.005, max_delay: float = 1000.0) -> None:
        if base_delay <= 0 or max_delay < base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._failures: dict[Hashable, int] = {}

    def when(self, item: Hashable) -> float:
        """Return the backoff for ``item`` and count one more failure."""
        exp = self._failures.get(item, 0)
        self._failures[item] = exp + 1
        # 2**exp overflows a float long after the cap is reached; stop computing early.
        if exp >= 64:
            return self.max_delay
        return min(self.base_delay * 2.0**exp, self.max_delay)

    def forget(self, item: Hashable) -> None:
        """Reset the failure count of ``item``."""
        self._failures.pop(item, None)

    def num_requeues(self, item: Hashable) -> int:
        """Return the number of failures counted for ``item``."""
        return self._failures.get(item, 0)


class BucketRateLimiter:
    """An overall token bucket (like ``golang.org/x/time/rate``): ``qps`` tokens per second, ``burst`` deep.

    ``when`` reserves a token and returns how long the caller must wait for it; reservations may run the
    bucket negative, which is what spaces out a burst of retries at ``1/qps`` intervals. It is not per
    item, so ``forget`` does nothing and ``num_requeues`` is always 0.
    """

    def __init__(self, qps: float = 10.0, burst: int = 100, clock: Clock = time.monotonic) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("need qps > 0 and burst >= 1")
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def when(self, item: Hashable) -> float:
        """Reserve one token and return the wait until it is available (0 when one is in the bucket)."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.qps)
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.qps

    def forget(self, item: Hashable) -> None:
        """No per-item state: nothing to forget."""

    def num_requeues(self, item: Hashable) -> int:
        """No per-item state: always 0."""
        return 0


class MaxOfRateLimiter:
    """Combines limiters: the delay is the largest any of them asks for; forget forgets in all."""

    def __init__(self, limiters: Sequence[RateLimiter]) -> None:
        if not limiters:
            raise ValueError("need at least one limiter")
        self.limiters = list(limiters)

    def when(self, item: Hashable) -> float:
        """Return the maximum delay of all limiters (each one counts the failure)."""
        return max(limiter.when(item) for limiter in self.limiters)

    def forget(self, item: Hashable) -> None:
        """Forget ``item`` in every limiter."""
        for limiter in self.limiters:
            limiter.forget(item)

    def num_requeues(self, item: Hashable) -> int:
        """Return the largest requeue count any limiter reports."""
        return max(limiter.num_requeues(item) for limiter in self.limiters)


def default_controller_rate_limiter(
    base_delay: float = 0.005,
    max_delay: float = 1000.0,
    qps: float = 10.0,
    burst: int = 100,
    clock: Clock = time.monotonic,
) -> MaxOfRateLimiter:
    """client-go's ``DefaultControllerRateLimiter``: max(per-item 5 ms..1000 s, bucket 10 qps / 100 burst)."""
    return MaxOfRateLimiter(
        [ItemExponentialFailureRateLimiter(base_delay, max_delay), BucketRateLimiter(qps, burst, clock)]
    )
