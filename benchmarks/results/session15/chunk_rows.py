"""Session 15, call 3: whether the wide-head chunked attention's chunk height matters where the 64 MiB budget gives an
unaligned one. Gemma-4-E2B's full layer (8 heads of 512, one K/V head) at 6,144 tokens gets 341-row chunks; its step
there ran 22% slower than the speed model prices (4,096 and 8,192 tokens, 512 and 256 rows: 5-8%). Forward and
backward, fused rows, bf16, median of CUDA-event timings, rows 341 against 320, 384, 256 and 512.
Run from the repository root: PYTHONPATH=. python3 benchmarks/results/session15/chunk_rows.py"""

import json

import torch

from benchmarks.fwd_bwd import forward_backward
from benchmarks.harness import median_ms
from vramplan.train.attention import chunked_attention

results = []
for name, (b, h, h_kv, s, d) in {"gemma-4-e2b full 6144": (1, 8, 1, 6144, 512),
                                 "gemma-4-e2b full 4096": (1, 8, 1, 4096, 512)}.items():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.5).requires_grad_()
    k = (torch.randn(b, h_kv, s, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.5).requires_grad_()
    v = torch.randn(b, h_kv, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    for rows in (341, 320, 384, 256, 512):
        step = forward_backward(lambda: chunked_attention(q, k, v, scale=1.0, causal=True, chunk=rows), (q, k, v), (grad,))
        results.append({"shape": name, "rows": rows, "ms": median_ms(step)})
        print(json.dumps(results[-1]))
