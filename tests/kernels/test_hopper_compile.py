"""The kernels this project changed most recently, compiled for a Hopper GPU (sm_90) by the real Triton
compiler and ptxas on the CPU, with the installed Triton and with the GPU machine's 3.6 where CI put it
beside (``VRAMPLAN_TRITON_36``, a ``--target`` directory). The interpreter runs what a compiler may refuse:
Triton 3.6 read a bare 1e-38 as fp64 and refused to compile the fused 8-bit AdamW on the H100 (3.9
accepts it); this test, run with 3.6 on that kernel as it was, fails with the H100's error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vramplan_kernels import adamw8bit, linear_cross_entropy as lce

    def compile_for_hopper(fn, signature, constexprs):
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

    for acc, name in ((tl.float32, "fp32"), (tl.float64, "fp64")):
        for softcap in (True, False):
            rows = dict(logits_ptr="*bf16", logits_row_stride="i64", labels_ptr="*i64")
            compile_for_hopper(lce._online_softmax_slice_kernel, dict(
                rows, run_max_ptr=f"*{name}", run_sum_ptr=f"*{name}", target_ptr=f"*{name}", alpha_ptr=f"*{name}",
                v0="i32", n_cols="i32", softcap="fp32", HAS_SOFTCAP="constexpr", WRITE_P="constexpr",
                ACC_DTYPE="constexpr", BLOCK_V="constexpr"),
                dict(HAS_SOFTCAP=softcap, WRITE_P=True, ACC_DTYPE=acc, BLOCK_V=8192))
            compile_for_hopper(lce._cross_entropy_rows_kernel, dict(
                rows, loss_ptr=f"*{name}", grad_scale_ptr=f"*{name}", grad_scale_stride="i32", n_cols="i32",
                ignore_index="i32", softcap="fp32", HAS_SOFTCAP="constexpr", WRITE_GRAD="constexpr",
                ACC_DTYPE="constexpr", BLOCK_V="constexpr"),
                dict(HAS_SOFTCAP=softcap, WRITE_GRAD=True, ACC_DTYPE=acc, BLOCK_V=16384))
            partials = dict(part_max_ptr=f"*{name}", part_sum_ptr=f"*{name}")
            compile_for_hopper(lce._row_partials_kernel, dict(
                logits_ptr="*bf16", logits_row_stride="i64", **partials, n_cols="i32", segment="i32", softcap="fp32",
                SPLITS="constexpr", HAS_SOFTCAP="constexpr", ACC_DTYPE="constexpr", BLOCK_V="constexpr"),
                dict(SPLITS=4, HAS_SOFTCAP=softcap, ACC_DTYPE=acc, BLOCK_V=8192))
            compile_for_hopper(lce._row_finish_kernel, dict(
                rows, loss_ptr=f"*{name}", grad_scale_ptr=f"*{name}", grad_scale_stride="i32", **partials,
                n_splits="i32", n_cols="i32", segment="i32", ignore_index="i32", softcap="fp32", SPLITS="constexpr",
                HAS_SOFTCAP="constexpr", WRITE_GRAD="constexpr", ACC_DTYPE="constexpr", BLOCK_V="constexpr"),
                dict(SPLITS=4, HAS_SOFTCAP=softcap, WRITE_GRAD=True, ACC_DTYPE=acc, BLOCK_V=8192))
    pointers = dict(P="*fp32", G="*fp32", MQ="*u8", M_ABSMAX="*fp32", VQ="*u8", V_ABSMAX="*fp32", M_CODE="*fp32",
                    M_MID="*fp32", V_CODE="*fp32", V_MID="*fp32", LR="*fp32", STEP="*fp32", SCALE="*fp32", n="i64")
    scalars = {k: "fp32" for k in ("beta1", "one_minus_beta1", "log2_beta1", "beta2", "one_minus_beta2", "log2_beta2",
                                   "eps", "weight_decay")}
    compile_for_hopper(adamw8bit._adamw8bit_kernel, dict(pointers, **scalars, BLOCKS="constexpr", BLOCKSIZE="constexpr"),
                       dict(BLOCKS=adamw8bit._BLOCKS_PER_PROGRAM, BLOCKSIZE=adamw8bit.BLOCKSIZE))
    from vramplan_kernels import qlora_linear as ql
    for fn, rows, stride in ((ql._nf4_matmul_wt_kernel, "a_ptr", "stride_am"), (ql._nf4_matmul_w_kernel, "g_ptr", "stride_gm")):
        for double_quant, (bm, bn, bk), even_k in ((True, (16, 64, 128), True), (False, (64, 128, 256), False)):
            signature = {rows: "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
                         "scale_ptr": "*fp32", "code8_ptr": "*fp32", "offset_ptr": "*fp32", "code4_ptr": "*fp32",
                         "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", stride: "i32", "m_bucket": "i32",
                         "splits": "i32", "BLOCKSIZE": "constexpr", "DOUBLE_QUANT": "constexpr", "BLOCK_M": "constexpr",
                         "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "EVEN_K": "constexpr", "DOT_IN_FP32": "constexpr"}
            compile_for_hopper(fn, signature, dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, BLOCK_M=bm, BLOCK_N=bn,
                                                   BLOCK_K=bk, EVEN_K=even_k, DOT_IN_FP32=False))
    compile_for_hopper(ql._sum_splits_kernel, dict(partial_ptr="*fp32", out_ptr="*bf16", numel="i32", splits="i32",
                                                   BLOCK="constexpr"), dict(BLOCK=1024))
    print("compiled")
''')


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except Exception:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas"))


@pytest.mark.parametrize("side", ["installed", "3.6"])
def test_kernels_compile_for_hopper(side):
    """In a fresh process without TRITON_INTERPRET (the test session runs the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if side == "3.6":
        folder = os.environ.get("VRAMPLAN_TRITON_36", "")
        if not os.path.isdir(os.path.join(folder, "triton")):
            pytest.skip("no Triton 3.6 beside the installed one (.ci/run puts it in $VRAMPLAN_TRITON_36)")
        env["PYTHONPATH"] = os.pathsep.join([folder, *filter(None, [env.get("PYTHONPATH")])])
    elif not _ptxas_available():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
