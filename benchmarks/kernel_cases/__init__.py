"""One module per kernel; each defines ``cases(device) -> list[Case]`` for benchmarks/kernels.py."""
