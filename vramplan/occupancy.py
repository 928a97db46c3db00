"""How busy a GPU's SMs stay while a tiled attention kernel runs.

Flash-style attention kernels split each head's rows into tiles and give every tile to one program
(one thread block); at the head widths that matter here one program fills an SM. The forward owns a tile
of queries and loops over keys, the backward owns a tile of keys and loops over queries. Programs start
in launch order as SMs free up, so a kernel lasts as long as its busiest SM. Two things leave SMs idle:

* too few programs: Gemma-4-E2B's 8 heads at 1,024 tokens make 64 forward programs for 132 SMs, so the
  kernel takes the time of a 2,048-token row's 128 programs;
* programs of unequal length under a causal mask, where the last ones to start finish well after the
  rest.

The work is quadratic in the row only once both effects are small. :func:`fill` is the share of the SMs'
time a kernel keeps busy, so its time is ``work / (SMs' rate x efficiency x fill)``. H100 profiles at
1,024 and 2,048 tokens (benchmarks/results/session9/profile-graphs-*-1024.txt against
benchmarks/results/profiles/profile-*-2048.txt) back this: per call, 1,024 tokens took 0.38 and 0.36 of
2,048's time on Llama-3.2-1B (forward, backward; a quadratic count says 0.25, this model 0.33 and 0.33),
0.47 and 0.27 on Gemma-4-E2B's sliding layers (0.50 and 0.25 here), and 0.29 and 0.35 on its
512-wide heads (0.33 and 0.31 here); tests/test_occupancy.py holds each within 15%. A GPU of unknown SM count (``sms`` 0) is taken as kept full.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Tiling:
    """How one attention kernel splits a head: ``rows`` of the side each program owns (queries forward,
    keys backward), ``step`` rows of the other side per loop iteration."""

    rows: int
    step: int
    owns_queries: bool


#: cuDNN's sm90 flash kernels (SDPA's default on Hopper) tile by 128 both ways; their backward owns 64 keys
#: a program at 256-wide heads (Gemma's sliding layers: 1,024 tokens took 0.27 of 2,048's time, which
#: 128-key programs, one wave at either length, would make 0.50).
FLASH_FORWARD = Tiling(128, 128, owns_queries=True)
FLASH_BACKWARD = Tiling(128, 128, owns_queries=False)
FLASH_BACKWARD_256 = Tiling(64, 128, owns_queries=False)
#: The memory-efficient kernels SDPA falls back to for heads wider than 256 (their names give the tiles:
#: fmha_cutlassF_..._32x128, fmha_cutlassB_..._128x64).
WIDE_FORWARD = Tiling(32, 128, owns_queries=True)
WIDE_BACKWARD = Tiling(64, 128, owns_queries=False)

#: Above this many programs the schedule is not simulated: what is left is the last programs' tail (half
#: the longest program, on average) after a long run of full waves, within 2% of the simulation.
SIMULATED_PROGRAMS = 16384


def program_steps(seq: int, tiling: Tiling, causal: bool) -> list[int]:
    """Loop iterations of each of one head's programs, in launch order. Causal: a query tile stops at the
    diagonal, a key tile starts there; otherwise (a mask handed in, or none) every program walks the row."""
    programs = math.ceil(seq / tiling.rows)
    if not causal:
        return [math.ceil(seq / tiling.step)] * programs
    if tiling.owns_queries:
        return [math.ceil(min(seq, (i + 1) * tiling.rows) / tiling.step) for i in range(programs)]
    return [math.ceil((seq - i * tiling.rows) / tiling.step) for i in range(programs)]


@lru_cache(maxsize=4096)
def fill(seq: int, heads: int, tiling: Tiling, causal: bool, sms: int) -> float:
    """The share of ``sms`` SMs' time a kernel over ``heads`` heads (times the batch) of a ``seq``-token row
    spends on the blocks a FLOP count counts (the causal triangle, not the diagonal tiles' masked half): that
    work spread evenly over the SMs, over the time its busiest SM takes (programs started greedily, in order)."""
    if sms <= 0:
        return 1.0
    steps = program_steps(seq, tiling, causal)
    keys = (seq + 1) / 2 if causal else seq
    counted = heads * seq * keys / (tiling.rows * tiling.step)
    if len(steps) * heads > SIMULATED_PROGRAMS:
        return (counted / sms) / (sum(steps) * heads / sms + max(steps) / 2)
    finish = [0] * sms
    for _ in range(heads):
        for step in steps:
            heapq.heapreplace(finish, finish[0] + step)
    return (counted / sms) / max(finish)
