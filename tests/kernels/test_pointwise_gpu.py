"""rmsnorm, rope and glu compiled on a GPU, at model shapes, against their references in fp32."""

import pytest
import torch

from benchmarks.kernel_cases.rope import rotary_cos_sin
from vramplan_kernels.dispatch import kernel_mode
from vramplan_kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference
from vramplan_kernels.rmsnorm import rms_norm, rms_norm_reference
from vramplan_kernels.rope import apply_rope, rope_reference

pytestmark = pytest.mark.gpu
TOKENS = 1000


def _grads(fn, inputs, grads):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*[leaf * 1 for leaf in leaves])
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.clone() for g in grads])
    return [o.detach().float() for o in outs] + [leaf.grad.float() for leaf in leaves]


def _close(got, want, rel):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rel, atol=rel * w.abs().max().item())


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hidden,offset,cast_mode", [(1536, 0.0, "gemma"), (2560, 1.0, "gemma"), (4096, 0.0, "llama"),
                                                     (256, 0.0, "gemma")])
def test_rmsnorm(hidden, offset, cast_mode, dtype, rel):
    x = torch.randn(TOKENS, 8, hidden, device="cuda", dtype=dtype)
    w = torch.rand(hidden, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    with kernel_mode("triton"):
        got = _grads(lambda x, w: rms_norm(x, w, 1e-6, offset, cast_mode), [x, w], [dy])
        got_unweighted = _grads(lambda x: rms_norm(x, None, 1e-6, offset, cast_mode), [x], [dy])
    want = _grads(lambda x, w: rms_norm_reference(x, w, 1e-6, offset, cast_mode), [x.float(), w.float()], [dy.float()])
    want_unweighted = _grads(lambda x: rms_norm_reference(x, None, 1e-6), [x.float()], [dy.float()])
    _close(got, want, rel)
    _close(got_unweighted, want_unweighted, rel)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv,head_dim,factor,unsqueeze_dim",
                         [(8, 1, 256, 1.0, 2), (8, 2, 512, 0.25, 2), (32, 8, 128, 1.0, 1)])
def test_rope(heads, kv, head_dim, factor, unsqueeze_dim, dtype, rel):
    cos, sin, pairs = rotary_cos_sin(TOKENS, head_dim, 10_000.0, factor, "cuda", dtype)
    q = torch.randn(2, TOKENS, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, TOKENS, kv, head_dim, device="cuda", dtype=dtype)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    with kernel_mode("triton"):
        got = _grads(lambda q, k: apply_rope(q, k, cos, sin, unsqueeze_dim, pairs), [q, k], [dq, dk])
    want = _grads(lambda q, k: rope_reference(q, k, cos.float(), sin.float(), unsqueeze_dim),
                  [q.float(), k.float()], [dq.float(), dk.float()])
    _close(got, want, rel)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("op,reference", [(swiglu, swiglu_reference), (geglu, geglu_reference)])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_glu(op, reference, inplace_backward, dtype, rel):
    gate = torch.randn(TOKENS, 6144, device="cuda", dtype=dtype) * 3
    up = torch.randn_like(gate)
    dout = torch.randn_like(gate)
    with kernel_mode("triton"):
        got = _grads(lambda g, u: op(g, u, inplace_backward=inplace_backward), [gate, up], [dout])
    want = _grads(reference, [gate.float(), up.float()], [dout.float()])
    _close(got, want, rel)
