#!/usr/bin/env bash
# session 9, call 3: causal-capture graph profiles at 1,024 tokens, where the campaign's step times ran
# 10-26% above the speed model (Gemma-4-E2B, Llama-3.2-1B): which kernels do not shrink with the row.
benchmarks/run_on_gpu.sh profile_graphs:gemma-4-e2b-text:1024 profile_graphs:llama-3.2-1b:1024
