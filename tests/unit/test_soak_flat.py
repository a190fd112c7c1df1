"""`make soak`'s verdict on Redis memory (e2e/soak_tiering.assert_flat): swings
between samples pass, a trend fails."""

from __future__ import annotations

import pytest

from e2e.soak_tiering import assert_flat

MIB = 1024 * 1024


def curve(values_mib: list[float]) -> list[tuple[float, int]]:
    return [(30.0 * (i + 1), int(v * MIB)) for i, v in enumerate(values_mib)]


def test_memory_that_swings_without_a_trend_is_flat() -> None:
    # What a quiet soak printed: 8.7 to 14.3 MiB, back and forth.
    samples = curve([10.2, 14.3, 10.0, 13.5, 13.6, 9.3, 13.0, 12.9, 8.7, 13.7, 9.5, 13.9, 9.1, 13.2])
    assert "first half median" in assert_flat(samples, warmup_s=60)


@pytest.mark.parametrize(
    "values",
    [
        [9 + 0.8 * i for i in range(20)],  # every append kept: a steady climb
        [9.0] * 10 + [14.0] * 10,  # a step up in the second half
    ],
)
def test_memory_that_grows_is_not_flat(values: list[float]) -> None:
    with pytest.raises(AssertionError, match="not flat"):
        assert_flat(curve(values), warmup_s=60)


def test_a_run_too_short_to_judge_says_so() -> None:
    with pytest.raises(AssertionError, match="too few samples"):
        assert_flat(curve([9.0, 9.1, 9.2]), warmup_s=60)
