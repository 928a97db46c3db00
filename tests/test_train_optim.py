"""The one-sync 8-bit AdamW steps exactly as bitsandbytes' own class (CPU backend of bitsandbytes)."""

import pytest
import torch

from vramplan.train.optim import eight_bit_adamw


@pytest.mark.parametrize("paged", [True, False])
def test_same_updates_as_bitsandbytes(paged):
    bnb = pytest.importorskip("bitsandbytes")
    theirs_cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    torch.manual_seed(0)
    start = [torch.randn(16, 4096), torch.randn(300, 16), torch.randn(10)]  # 8-bit, 8-bit, 32-bit state
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    try:
        opt_theirs = theirs_cls(theirs, lr=1e-2, weight_decay=0.01)
        opt_ours = eight_bit_adamw(paged)(ours, lr=1e-2, weight_decay=0.01)
        for step in range(3):
            for a, b in zip(ours, theirs):
                g = torch.randn_like(a)
                a.grad, b.grad = g.clone(), g.clone()
            ours[2].grad = None if step == 1 else ours[2].grad  # a parameter without a gradient is skipped
            theirs[2].grad = None if step == 1 else theirs[2].grad
            opt_theirs.step()
            opt_ours.step()
    except RuntimeError as e:  # bitsandbytes built without a CPU backend
        pytest.skip(f"bitsandbytes 8-bit optimizers do not step on the CPU here: {e}")
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], start[0])
    assert isinstance(opt_ours, theirs_cls)
