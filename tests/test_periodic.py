"""Periodic workers: no drift, no pile-up, errors logged and survived, cancellation respected."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from vpnd.periodic import BrokenInvariant, run_periodic


async def test_rounds_follow_the_grid_without_drift(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []

    async def round_fn() -> int:
        starts.append(trio.current_time())
        await trio.sleep(0.3)  # work takes time; the next start must still be on the grid
        return 1

    with trio.move_on_after(10.05):
        await run_periodic("grid", 1.0, round_fn)
    assert [round(s, 6) for s in starts] == [float(i) for i in range(11)]


async def test_overrun_starts_next_round_at_once_without_stacking(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []

    async def round_fn() -> None:
        starts.append(trio.current_time())
        if len(starts) == 2:
            await trio.sleep(3.5)  # overruns three periods

    with trio.move_on_after(7.5):
        await run_periodic("overrun", 1.0, round_fn)
    # 0, 1 (runs to 4.5), then at once 4.5, then 5.5, 6.5 — not 2, 3, 4 crammed in.
    assert [round(s, 6) for s in starts] == [0.0, 1.0, 4.5, 5.5, 6.5]


async def test_errors_are_survived_but_broken_invariants_crash(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("transient")
        if calls == 4:
            raise BrokenInvariant("ledger does not match balance")

    with pytest.raises(BrokenInvariant):
        await run_periodic("flaky", 1.0, flaky)
    assert calls == 4
    assert "event=worker_round_failed worker=flaky error=RuntimeError" in caplog.text


async def test_round_timeout_bounds_a_stuck_round(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []

    async def stuck() -> None:
        starts.append(trio.current_time())
        await trio.sleep_forever()

    with trio.move_on_after(25):
        await run_periodic("stuck", 1.0, stuck, round_timeout=10)
    assert [round(s) for s in starts] == [0, 10, 20]
