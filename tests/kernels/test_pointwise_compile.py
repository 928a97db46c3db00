"""The rmsnorm, rope and glu kernels compile for an H100 (sm_90) — checked on a machine without a
GPU, since the interpreter accepts code that the compiler rejects (and vice versa)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r'''
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vramplan_kernels import glu, rmsnorm, rope

def compile_for_h100(fn, types, constexprs):
    signature = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32))
    assert ".entry" in kernel.asm["ptx"]

bf16 = lambda *names: {n: "*bf16" for n in names}
fp32 = lambda *names: {n: "fp32" for n in names}
for has_weight, llama in ((True, True), (True, False), (False, False)):
    compile_for_h100(rmsnorm._rms_norm_forward_kernel, {**bf16("Y", "X", "W"), "RSTD": "*fp32", **fp32("eps", "offset")},
                     {"HAS_WEIGHT": has_weight, "LLAMA_CAST": llama, "ACC": tl.float32, "ROWS": 1, "BLOCK": 4096})
compile_for_h100(rmsnorm._rms_norm_forward_kernel, {**bf16("Y", "X", "W"), "RSTD": "*fp32", **fp32("eps", "offset")},
                 {"HAS_WEIGHT": True, "LLAMA_CAST": False, "ACC": tl.float32, "ROWS": 8, "BLOCK": 256})
for compute_dw, rows, block in ((True, 1, 2048), (True, 16, 256), (False, 8, 256)):
    compile_for_h100(rmsnorm._rms_norm_backward_kernel,
                     {**bf16("DX", "DY", "X", "W"), "RSTD": "*fp32", "DW_PARTIAL": "*fp32", "offset": "fp32"},
                     {"HAS_WEIGHT": True, "LLAMA_CAST": True, "COMPUTE_DW": compute_dw, "ACC": tl.float32,
                      "ROWS": rows, "BLOCK": block})
rope_types = {**bf16("Q", "QY", "K", "KY", "COS", "SIN"), "q_sb": "i64", "k_sb": "i64"}
for backward, k_heads, block_kh, q_heads, pairs, tokens, same, reverse in (
        (False, 8, 8, 32, 64, 1, False, False), (True, 1, 1, 8, 128, 4, True, False), (False, 0, 1, 8, 64, 4, True, False),
        (False, 1, 1, 8, 128, 4, True, True)):  # first to last (False) and last to first (True)
    compile_for_h100(rope._rope_kernel, rope_types,
                     {"N_Q_HEADS": q_heads, "N_K_HEADS": k_heads, "HALF": 2 * pairs if pairs == 64 else pairs,
                      "N_PAIRS": pairs, "BACKWARD": backward, "BLOCK_QH": q_heads, "BLOCK_KH": block_kh,
                      "BLOCK_P": pairs, "BLOCK_T": tokens, "SAME_HALVES": same, "ACC": tl.float32,
                      "REVERSE": reverse})
for kind in (glu.SILU, glu.GELU_TANH):
    compile_for_h100(glu._glu_forward_kernel, bf16("GATE", "UP", "OUT"), {"KIND": kind, "ACC": tl.float32, "BLOCK": 1024})
    compile_for_h100(glu._glu_backward_kernel, bf16("DOUT", "GATE", "UP", "DGATE", "DUP"),
                     {"KIND": kind, "ACC": tl.float32, "BLOCK": 1024})
print("compiled")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels' own tests compile them")
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.compiler")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / ".dev"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if "cannot import name 'ASTSource'" in result.stderr or "GPUTarget" in result.stderr and "ImportError" in result.stderr:
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
