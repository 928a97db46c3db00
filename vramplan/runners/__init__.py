"""Runnable training stacks, used to measure what the planner predicts (calibrate, check --dry-run,
benchmarks): each builds a model for a plan and runs real steps on the GPU."""
