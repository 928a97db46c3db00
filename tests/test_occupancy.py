"""The SM occupancy of tiled attention kernels (vramplan.occupancy) against the H100 profiles it describes."""

import pytest

from vramplan import occupancy
from vramplan.occupancy import FLASH_BACKWARD, FLASH_BACKWARD_256, FLASH_FORWARD, WIDE_BACKWARD, WIDE_FORWARD, fill

H100_SMS = 132


def test_causal_programs_stop_or_start_at_the_diagonal():
    assert occupancy.program_steps(300, FLASH_FORWARD, causal=True) == [1, 2, 3]
    assert occupancy.program_steps(300, FLASH_BACKWARD, causal=True) == [3, 2, 1]
    assert occupancy.program_steps(300, FLASH_FORWARD, causal=False) == [3, 3, 3]
    assert occupancy.program_steps(1, WIDE_FORWARD, causal=True) == [1]


def test_too_few_programs_leave_sms_idle_and_long_rows_fill_them():
    # Gemma-4-E2B's sliding layers at 1,024 tokens: 8 heads x 8 query tiles = 64 programs on 132 SMs
    assert fill(1024, 8, FLASH_FORWARD, False, H100_SMS) == pytest.approx(64 / 132)
    assert fill(2048, 8, FLASH_FORWARD, False, H100_SMS) == pytest.approx(128 / 132)
    assert fill(32768, 32, FLASH_FORWARD, True, H100_SMS) > 0.97
    assert fill(1024, 8, FLASH_FORWARD, False, 0) == 1.0  # unknown SM count: taken as full
    # more SMs, emptier at one shape
    assert fill(1024, 32, FLASH_FORWARD, True, 24) > fill(1024, 32, FLASH_FORWARD, True, H100_SMS)


def test_the_tail_estimate_above_the_simulated_size_agrees_with_the_simulation():
    heads = occupancy.SIMULATED_PROGRAMS // 128  # 2 x 128-row programs per 256 tokens: just at the limit
    simulated = fill(16384, heads, FLASH_FORWARD, True, H100_SMS)
    estimated = fill(16384, heads + 1, FLASH_FORWARD, True, H100_SMS)
    assert estimated == pytest.approx(simulated, rel=0.02)


@pytest.mark.parametrize("name, heads, tiling, causal, at_1024_us, at_2048_us", [
    # per-call kernel times from the H100 graph profiles: session9/profile-graphs-*-1024.txt, session8/*-2048.txt
    ("llama forward", 32, FLASH_FORWARD, True, 21.377, 56.048),
    ("llama backward", 32, FLASH_BACKWARD, True, 52.384, 144.213),
    ("e2b sliding forward", 8, FLASH_FORWARD, False, 61.282, 129.863),
    ("e2b sliding backward", 8, FLASH_BACKWARD_256, False, 112.993, 426.922),
    ("e2b wide forward", 8, WIDE_FORWARD, True, 116.538, 400.912),
    ("e2b wide backward", 8, WIDE_BACKWARD, True, 2354.0, 6650.0),
])
def test_short_rows_take_the_share_of_the_long_rows_time_the_profiles_measured(name, heads, tiling, causal,
                                                                                at_1024_us, at_2048_us):
    """Work over fill, 1,024 against 2,048 tokens, within 15% of the measured ratio; a count of FLOPs alone
    says 0.25 for every kernel, 47% off for the sliding layers' forward (measured 0.47)."""
    work = 1024 * (1024 + causal) / (2048 * (2048 + causal))  # the s^2 blocks a FLOP count counts
    predicted = work * fill(2048, heads, tiling, causal, H100_SMS) / fill(1024, heads, tiling, causal, H100_SMS)
    assert predicted == pytest.approx(at_1024_us / at_2048_us, rel=0.15), name
