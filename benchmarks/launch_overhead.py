"""Host cost of one launch, on the GPU: microseconds per call of the trainer's small pieces.

Tiny tensors, so the GPU never limits; each figure is wall time per call over many calls.
Run on a CUDA machine: ``python -m benchmarks.launch_overhead``.
"""

from __future__ import annotations

import time

import torch
import triton

from vramplan_kernels import nf4
from vramplan_kernels.glu import swiglu
from vramplan_kernels.qlora_linear import QLoRALinear, base_path
from vramplan_kernels.rmsnorm import rms_norm


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    dev = "cuda"
    small = torch.zeros(64, device=dev)
    print(f"torch add_ (one aten op): {per_call_us(lambda: small.add_(1)):.1f} us")
    q = nf4.quantize_nf4(torch.randn(64, 256, device=dev))
    out = torch.empty(q.shape, dtype=torch.bfloat16, device=dev)
    launch = nf4._dequant_launch(q)
    kernel = launch.kernel
    args = launch.args(out)[:-len(launch.constexpr_values)]
    print(f"dequant, static config + enable_fp_fusion kwarg: {per_call_us(lambda: kernel[launch.grid](*args, **launch.constexprs)):.1f} us")
    plain = {k: v for k, v in launch.constexprs.items() if k != "enable_fp_fusion"}
    print(f"dequant, static config, no compile kwarg: {per_call_us(lambda: kernel[launch.grid](*args, **plain)):.1f} us")
    configs = [triton.Config({"BLOCK_BYTES": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]
    tuned = triton.autotune(configs, key=["n_bytes", "DOUBLE_QUANT"])(nf4._nf4_dequantize_kernel)
    grid = lambda meta: (triton.cdiv(launch.n_bytes, meta["BLOCK_BYTES"]),)  # noqa: E731
    byte_args = (*launch.tensors, out, launch.n, launch.n_bytes)
    print(f"dequant, autotuned + kwarg: {per_call_us(lambda: tuned[grid](*byte_args, BLOCKSIZE=64, DOUBLE_QUANT=True, enable_fp_fusion=False)):.1f} us")
    print(f"dequantize_nf4(out=): {per_call_us(lambda: nf4.dequantize_nf4(q, out=out)):.1f} us")
    try:
        compiled = kernel[launch.grid](*args, **launch.constexprs)
        full = launch.args(out)
        runner = compiled[launch.grid]
        print(f"dequant, compiled handle (all args): {per_call_us(lambda: runner(*full)):.1f} us")
    except Exception as e:  # noqa: BLE001
        print("compiled handle launch failed:", type(e).__name__, e)
    x = torch.randn(1, 16, 2048, dtype=torch.bfloat16, device=dev, requires_grad=True)
    w = torch.ones(2048, dtype=torch.bfloat16, device=dev)
    print(f"rms_norm fwd: {per_call_us(lambda: rms_norm(x, w, 1e-6)):.1f} us")
    g = torch.randn(16, 8192, dtype=torch.bfloat16, device=dev, requires_grad=True)
    u = torch.randn(16, 8192, dtype=torch.bfloat16, device=dev, requires_grad=True)
    print(f"swiglu fwd: {per_call_us(lambda: swiglu(g, u)):.1f} us")
    layer = QLoRALinear.from_linear(torch.nn.Linear(2048, 2048, bias=False, device=dev, dtype=torch.bfloat16), 16, 32)
    layer.lora_A.weight.requires_grad_(True)
    layer.lora_B.weight.requires_grad_(True)
    xb = torch.randn(1, 128, 2048, dtype=torch.bfloat16, device=dev, requires_grad=True)
    with base_path("dequant"):
        print(f"QLoRALinear fwd: {per_call_us(lambda: layer(xb), 1000):.1f} us")

        def fwd_bwd():
            layer(xb).sum().backward()
        print(f"QLoRALinear fwd+bwd (+sum, backward engine): {per_call_us(fwd_bwd, 500):.1f} us")
    import bitsandbytes as bnb

    from vramplan.train.optim import eight_bit_adamw

    shapes = [(16, 2048), (2048, 16)] * 112
    for name, cls in (("bnb PagedAdamW8bit", bnb.optim.PagedAdamW8bit), ("one-sync PagedAdamW8bit", eight_bit_adamw(True))):
        params = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = cls(params, lr=1e-4)
        print(f"{name} step, 224 LoRA tensors: {per_call_us(opt.step, 20) / 1e3:.2f} ms")
    for n, k in ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)):
        qw = nf4.quantize_nf4(torch.randn(n, k, device=dev))
        o = torch.empty(n, k, dtype=torch.bfloat16, device=dev)
        lw = nf4._dequant_launch(qw)
        a = lw.args(o)[:-len(lw.constexpr_values)]
        static = triton.testing.do_bench(lambda: lw.kernel[lw.grid](*a, **lw.constexprs))
        best = triton.testing.do_bench(lambda: tuned[lambda m: (triton.cdiv(lw.n_bytes, m["BLOCK_BYTES"]),)](
            *lw.tensors, o, lw.n, lw.n_bytes, BLOCKSIZE=64, DOUBLE_QUANT=True, enable_fp_fusion=False))
        print(f"dequant {n}x{k}: static {lw.config} {static * 1e3:.1f} us, "
              f"byte kernel autotuned {tuned.best_config} {best * 1e3:.1f} us")


if __name__ == "__main__":
    main()
