"""Fused 8-bit AdamW: the Triton kernel (in the interpreter) against its reference, the reference
against torch AdamW and bitsandbytes, and the device-side clipping scale."""

import math

import pytest
import torch

from vramplan_kernels.adamw8bit import (BLOCKSIZE, AdamW8bitState, adamw8bit_reference, adamw8bit_step, clip_scale,
                                        dynamic_map)
from vramplan_kernels.dispatch import kernel_mode


def _scalars(lr, step, scale=1.0, device="cpu"):
    return [torch.tensor(x, dtype=torch.float32, device=device) for x in (lr, step, scale)]


def _run(mode, p0, grads, lrs, scales=None, weight_decay=0.01):
    p = p0.clone()
    state = AdamW8bitState.zeros(p.numel(), p.device)
    with kernel_mode(mode):
        for i, (g, lr) in enumerate(zip(grads, lrs)):
            scale = scales[i] if scales else 1.0
            adamw8bit_step(p, g, state, *_scalars(lr, i + 1, scale, p.device), weight_decay=weight_decay)
    return p, state


def test_code_maps_are_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        ours = dynamic_map(signed)
        assert ours.shape == (256,) and torch.equal(ours, F.create_dynamic_map(signed=signed))
        assert torch.all(ours[1:] >= ours[:-1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("n", [1, 200, BLOCKSIZE, 3 * BLOCKSIZE + 17, 5000])
def test_kernel_matches_reference_over_steps(n, device):
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen).to(device)
    grads = [(torch.randn(n, generator=gen) * (10 ** torch.randint(-3, 2, (1,), generator=gen).item())).to(device)
             for _ in range(4)]
    lrs, scales = [1e-2, 3e-3, 3e-3, 1e-3], [1.0, 0.5, 1.0, 0.25]
    p_k, s_k = _run("triton", p0, grads, lrs, scales)
    p_r, s_r = _run("reference", p0, grads, lrs, scales)
    # the states see only g: bit-identical; p also sees exp2 (numpy's or the GPU's vs torch's), an fp32 ulp or so
    for a, b in ((s_k.m, s_r.m), (s_k.v, s_r.v), (s_k.m_absmax, s_r.m_absmax), (s_k.v_absmax, s_r.v_absmax)):
        assert torch.equal(a, b)
    torch.testing.assert_close(p_k, p_r, rtol=2e-6, atol=1e-7)
    assert not torch.equal(p_k, p0)


def test_states_are_quantized_to_the_nearest_code():
    """Dequantizing the states gives the nearest code of each exact (fp32) moment, per block."""
    gen = torch.Generator().manual_seed(1)
    n = 2 * BLOCKSIZE + 5
    g = torch.randn(n, generator=gen)
    _, state = _run("triton", torch.zeros(n), [g], [1e-3], weight_decay=0.0)
    m_exact = torch.nn.functional.pad(g * (1 - 0.9), (0, 3 * BLOCKSIZE - n)).view(3, BLOCKSIZE)
    absmax = m_exact.abs().amax(1)
    assert torch.equal(state.m_absmax, absmax)
    code = dynamic_map(True)
    scaled = (m_exact / absmax[:, None]).reshape(-1)[:n]
    got = code[state.m.long()]
    best = (scaled[:, None] - code[None, :]).abs().min(1).values
    assert torch.all((got - scaled).abs() <= best + 1e-7)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's numpy max over the NaN moments
def test_nan_scale_changes_nothing():
    n = 300
    p = torch.randn(n)
    state = AdamW8bitState.zeros(n, "cpu")
    adamw8bit_step(p, torch.randn(n), state, *_scalars(1e-2, 1))
    before = (p.clone(), state.m.clone(), state.v.clone(), state.m_absmax.clone(), state.v_absmax.clone())
    for mode in ("triton", "reference"):
        with kernel_mode(mode):
            adamw8bit_step(p, torch.randn(n), state, *_scalars(1e-2, 2, math.nan))
        after = (p, state.m, state.v, state.m_absmax, state.v_absmax)
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_clip_scale_is_torchs_clip_and_nan_when_not_finite():
    g = torch.randn(1000) * 3
    norm, scale = clip_scale(g, 1.0)
    params = [torch.nn.Parameter(torch.zeros(1000))]
    params[0].grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(norm, want)
    torch.testing.assert_close(g * scale, params[0].grad)
    assert norm.dim() == 0 and scale.dim() == 0
    assert clip_scale(g * 1e-6, 1.0)[1].item() == 1.0
    g[3] = math.inf
    assert math.isnan(clip_scale(g, 1.0)[1].item())


def test_tracks_torch_adamw_on_a_regression():
    """Least squares over 50 steps: the 8-bit states drift only a little from fp32 AdamW."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 40, generator=gen)
    w_true = torch.randn(40, 30, generator=gen)
    y = x @ w_true
    w0 = torch.randn(40 * 30, generator=gen) * 0.1

    def loss_grad(w):
        w = w.detach().requires_grad_()
        loss = ((x @ w.view(40, 30) - y) ** 2).mean()
        loss.backward()
        return loss.item(), w.grad

    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=3e-2, weight_decay=0.01)
    ours = w0.clone()
    state = AdamW8bitState.zeros(ours.numel(), "cpu")
    start = loss_grad(w0)[0]
    for step in range(1, 51):
        _, ref.grad = loss_grad(ref)
        opt.step()
        _, g = loss_grad(ours)
        with kernel_mode("triton"):
            adamw8bit_step(ours, g, state, *_scalars(3e-2, step), weight_decay=0.01)
    ours_loss, ref_loss = loss_grad(ours)[0], loss_grad(ref)[0]
    assert ref_loss < 0.2 * start
    assert ours_loss < 1.2 * ref_loss + 1e-3 * start, (ours_loss, ref_loss, start)
    drift = (ours - ref.detach()).norm() / (ref.detach() - w0).norm()
    assert drift < 0.05, drift


def test_one_step_as_bitsandbytes():
    """One step against bitsandbytes' own 8-bit blockwise AdamW (its CPU backend): the same absmax
    and parameters to fp32 rounding. Its CPU quantizer does not always pick the nearest code (a v
    of 7.5e-10·absmax becomes the code 1.6e-5, not 0), so codes may differ, but ours is never
    farther from the exact moment than its."""
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(3)
    n = 16 * BLOCKSIZE + 100  # 8-bit state from 4,096 values on
    p0, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    theirs = torch.nn.Parameter(p0.clone())
    theirs.grad = g.clone()
    opt = bnb.optim.AdamW8bit([theirs], lr=1e-2, weight_decay=0.01)
    try:
        opt.step()
    except RuntimeError as e:
        pytest.skip(f"bitsandbytes 8-bit optimizers do not step on the CPU here: {e}")
    st = opt.state[theirs]
    assert st["state1"].dtype == torch.uint8
    ours, state = _run("triton", p0, [g], [1e-2])
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-6)
    blocks = torch.arange(n) // BLOCKSIZE
    for q, absmax, q_bnb, absmax_bnb, exact, signed in (
            (state.m, state.m_absmax, st["state1"], st["absmax1"], g * (1 - 0.9), True),
            (state.v, state.v_absmax, st["state2"], st["absmax2"], g * g * (1 - 0.999), False)):
        torch.testing.assert_close(absmax, absmax_bnb, rtol=1e-6, atol=0)
        code = dynamic_map(signed)
        scaled = exact / absmax[blocks]
        ours_err, their_err = (code[q.long()] - scaled).abs(), (code[q_bnb.long()] - scaled).abs()
        assert torch.all(ours_err <= their_err + 1e-7)
        assert (q == q_bnb).float().mean() > 0.95


def test_rejects_mismatched_state_and_host_scalars():
    p = torch.zeros(300)
    with pytest.raises(ValueError, match="state of 256"):
        adamw8bit_step(p, p.clone(), AdamW8bitState.zeros(256, "cpu"), *_scalars(1e-3, 1))
    with pytest.raises(ValueError, match="one-value fp32"):
        adamw8bit_step(p, p.clone(), AdamW8bitState.zeros(300, "cpu"), torch.tensor(1e-3, dtype=torch.float64),
                       *_scalars(1, 1)[1:])


def test_reference_runs_on_its_own():
    p = torch.randn(10)
    state = AdamW8bitState.zeros(10, "cpu")
    adamw8bit_reference(p, torch.ones(10), state, *_scalars(1e-1, 1))
    assert state.m_absmax.item() == pytest.approx(0.1)
