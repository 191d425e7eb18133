"""Rate limiters: client-go's numbers (5 ms doubling to 1000 s; 10 qps / burst 100; max of both)."""

from __future__ import annotations

import pytest

from kaito.runtime.ratelimit import (
    BucketRateLimiter,
    ItemExponentialFailureRateLimiter,
    MaxOfRateLimiter,
    default_controller_rate_limiter,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_exponential_doubles_per_failure_and_caps() -> None:
    rl = ItemExponentialFailureRateLimiter(0.005, 1000.0)
    delays = [rl.when("a") for _ in range(20)]
    assert delays[:5] == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08])
    # 5 ms * 2**17 = 655 s < 1000 s; the 19th failure (2**18) is capped.
    assert delays[17] == pytest.approx(0.005 * 2**17)
    assert delays[18] == 1000.0 and delays[19] == 1000.0
    assert rl.num_requeues("a") == 20
    assert rl.when("b") == pytest.approx(0.005), "items are independent"
    rl.forget("a")
    assert rl.num_requeues("a") == 0
    assert rl.when("a") == pytest.approx(0.005)


def test_exponential_never_overflows() -> None:
    rl = ItemExponentialFailureRateLimiter(0.005, 1000.0)
    for _ in range(2000):
        d = rl.when("x")
    assert d == 1000.0


def test_bucket_burst_then_qps() -> None:
    clock = FakeClock()
    rl = BucketRateLimiter(qps=10, burst=100, clock=clock)
    assert [rl.when(i) for i in range(100)] == [0.0] * 100
    # Tokens go negative: reservations are spaced 1/qps apart.
    assert rl.when("x") == pytest.approx(0.1)
    assert rl.when("y") == pytest.approx(0.2)
    clock.now += 0.3  # three tokens refilled -> back at zero debt + 1 token
    assert rl.when("z") == pytest.approx(0.0)
    clock.now += 1000
    assert rl.when("w") == 0.0, "refill is capped at the burst"
    rl.forget("w")
    assert rl.num_requeues("w") == 0


def test_default_is_max_of_item_and_bucket() -> None:
    clock = FakeClock()
    rl = default_controller_rate_limiter(clock=clock)
    assert isinstance(rl, MaxOfRateLimiter)
    # First failure of each of 100 items: the exponential limiter says 5 ms, the bucket 0.
    assert all(rl.when(f"k{i}") == pytest.approx(0.005) for i in range(100))
    # The 101st retry in the same instant waits for the bucket (0.1 s > 5 ms).
    assert rl.when("k100") == pytest.approx(0.1)
    # A single item failing repeatedly is dominated by its own backoff.
    clock.now += 100
    for _ in range(9):
        rl.when("hot")
    assert rl.when("hot") == pytest.approx(0.005 * 2**9)
    assert rl.num_requeues("hot") == 10
    rl.forget("hot")
    assert rl.num_requeues("hot") == 0


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError):
        ItemExponentialFailureRateLimiter(0, 1)
    with pytest.raises(ValueError):
        BucketRateLimiter(qps=0)
    with pytest.raises(ValueError):
        MaxOfRateLimiter([])
