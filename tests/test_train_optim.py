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
        opt_ours = eight_bit_adamw(paged, flat=False)(ours, lr=1e-2, weight_decay=0.01)
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


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [True, False])
def test_flat_steps_one_tensor_with_bitsandbytes_per_tensor_updates(paged, device):
    """Adapters of 4,096+ values (8-bit state) in one flat buffer: bit-equal updates, one state."""
    bnb = pytest.importorskip("bitsandbytes")
    theirs_cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    torch.manual_seed(0)
    start = [torch.randn(16, 4096, device=device), torch.randn(300, 16, device=device),
             torch.randn(16, 300, device=device)]  # 4,800 values: not 256-aligned
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    try:
        opt_theirs = theirs_cls(theirs, lr=1e-2, weight_decay=0.01)
        opt_ours = eight_bit_adamw(paged)(ours, lr=1e-2, weight_decay=0.01)
        for _ in range(3):
            for a, b in zip(ours, theirs):
                g = torch.randn_like(a)
                a.grad, b.grad = g.clone(), g.clone()
            opt_theirs.step()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
    except RuntimeError as e:
        pytest.skip(f"bitsandbytes 8-bit optimizers do not step on the CPU here: {e}")
    assert len(opt_ours.state) == 1
    # one process: the gradients stay views of the flat gradient, zeroed in one launch
    assert all(p.grad is v and not v.any() for p, v in zip(ours, opt_ours.flat.grad_views))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert a.untyped_storage().data_ptr() == opt_ours.flat.param.untyped_storage().data_ptr()
    # the state dict round-trips into a fresh optimizer over the same adapters
    fresh = eight_bit_adamw(paged)([torch.nn.Parameter(t.clone()) for t in start], lr=1e-2)
    fresh.load_state_dict(opt_ours.state_dict())
    assert torch.equal(fresh.state[fresh.flat.param]["state1"], opt_ours.state[opt_ours.flat.param]["state1"])


def test_flat_adapters_cast_once_per_step_and_follow_updates():
    """QLoRALinear copies taken from the flat buffer's one cast: equal to casting each adapter."""
    from vramplan.train.ops import QLoRALinear
    from vramplan.train.optim import FlatLoRA

    torch.manual_seed(0)
    layers = [QLoRALinear.from_linear(torch.nn.Linear(64, 32, bias=False), 16, 32, quant="bf16") for _ in range(2)]
    params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    for p in params:
        torch.nn.init.normal_(p)
    before = [p.detach().clone() for p in params]
    flat = FlatLoRA(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # values kept, storage moved
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for layer in layers:
        a, b = layer.lora_A.weight, layer.lora_B.weight
        copies = layer._lora_copies.get(a, b, torch.bfloat16)
        assert torch.equal(copies[0], a.detach().bfloat16()) and torch.equal(copies[2], b.detach().bfloat16())
        assert copies[0].untyped_storage().data_ptr() == layers[0]._lora_copies.get(
            layers[0].lora_A.weight, layers[0].lora_B.weight, torch.bfloat16)[0].untyped_storage().data_ptr()
    flat.param.grad = torch.ones_like(flat.param)
    torch.optim.SGD([flat.param], lr=1.0).step()  # an optimizer's update of the flat tensor: copies follow
    layer = layers[1]
    assert torch.equal(layer._lora_copies.get(layer.lora_A.weight, layer.lora_B.weight, torch.bfloat16)[2],
                       layer.lora_B.weight.detach().bfloat16())
    with torch.no_grad():
        layer.lora_B.weight.copy_(before[3])  # loading an adapter in place: copies follow too
    assert torch.equal(layer._lora_copies.get(layer.lora_A.weight, layer.lora_B.weight, torch.bfloat16)[2],
                       before[3].bfloat16())
    flat.param.grad = None
    layer(x).float().sum().backward()
    flat.gather_grads()
    assert torch.equal(flat.grad_views[3], layer.lora_B.weight.grad) and flat.grad_views[0].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flat_gradient_sink_equals_autograd_with_accumulation_and_checkpointing(dtype, device):
    """The backward writing dA/dB into the flat buffer (one add_ per backward) gives exactly the
    gradients autograd accumulates per adapter, over two backward passes, checkpointed or not."""
    from vramplan.train.ops import QLoRALinear
    from vramplan.train.optim import FlatLoRA

    def stack(seed):
        torch.manual_seed(seed)
        layers = torch.nn.ModuleList(QLoRALinear.from_linear(torch.nn.Linear(64, 64, bias=False), 16, 24, quant="bf16")
                                     for _ in range(3)).to(device)
        for layer in layers:
            layer.weight.data = layer.weight.data.to(dtype)
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                torch.nn.init.normal_(p, std=0.1)
                p.requires_grad_(True)
        return layers

    def run(layers, x, checkpointed):
        h = x
        for layer in layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False) if checkpointed else layer(h)
        return h.float().square().sum()

    plain, flat_layers = stack(0), stack(0)
    params = [p for layer in flat_layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    flat = FlatLoRA(params)
    xs = [torch.randn(2, 5, 64, dtype=dtype, generator=torch.Generator().manual_seed(i)).to(device) for i in range(2)]
    for x, checkpointed in zip(xs, (False, True)):
        run(plain, x, checkpointed).backward()
        run(flat_layers, x, checkpointed).backward()
    for want, got in zip((p for layer in plain for p in (layer.lora_A.weight, layer.lora_B.weight)), params):
        assert got.grad.data_ptr() >= flat.grad.data_ptr() and torch.equal(got.grad, want.grad)
    flat.zero_grad()
    assert not flat.grad.any() and all(p.grad is not None for p in params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat", [True, False])
def test_a_queued_step_updates_and_zeroes_as_the_synced_one(flat, device):
    """``step(sync=False)`` and ``zero_grad_queued`` (the switch queued_optimizer) leave the same parameters
    and zero the same gradients in place as ``step()`` and ``zero_grad(set_to_none=False)``: the one wait is
    the caller's, and a CUDA graph's gradient buffers stay the tensors it captured."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    start = [torch.randn(16, 4096, device=device), torch.randn(300, 16, device=device)]
    runs = []
    for queued in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = eight_bit_adamw(True, flat=flat)(params, lr=1e-2, weight_decay=0.01)
        generator = torch.Generator(device).manual_seed(1)
        for _ in range(3):
            for p in params:
                g = torch.randn(p.shape, generator=generator, device=device)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)  # as a replayed graph accumulates into the buffers it holds
            held = [p.grad for p in params]
            optimizer.step(sync=False) if queued else optimizer.step()
            optimizer.zero_grad_queued() if queued else optimizer.zero_grad(set_to_none=False)
            if not flat:
                assert all(p.grad is g for p, g in zip(params, held))
            assert all(not p.grad.any() for p in params if p.grad is not None)
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not torch.equal(runs[1][0], start[0])


@pytest.mark.parametrize("device", DEVICES)
def test_paged_states_prefetched_on_their_first_step_only_when_the_switch_is_off(device, monkeypatch):
    """``prefetch_paged`` off: each parameter's states are prefetched on its first step and never again (a
    ``cudaMemPrefetchAsync`` from Python per state and step costs host time), and the parameters come out
    the same as with bitsandbytes' prefetch before every step."""
    pytest.importorskip("bitsandbytes")
    from vramplan.train import switches

    start = [torch.randn(16, 4096, device=device), torch.randn(300, 16, device=device)]
    runs, calls = [], []
    for prefetch in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = eight_bit_adamw(True, flat=False)(params, lr=1e-2, weight_decay=0.01)
        count = []
        original = optimizer.prefetch_state
        monkeypatch.setattr(optimizer, "prefetch_state", lambda p, original=original, count=count: (count.append(p), original(p)))
        generator = torch.Generator(device).manual_seed(1)
        with switches.forced(prefetch_paged=prefetch):
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=generator, device=device)
                optimizer.step()
        runs.append([p.detach().clone() for p in params])
        calls.append(len(count))
    assert calls == [3 * len(start), len(start)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
