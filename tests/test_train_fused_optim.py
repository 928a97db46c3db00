"""FusedAdamW8bit: the one-launch 8-bit AdamW over FlatLoRA against bitsandbytes' flat one, its
device-side lr, clipping and state dict, and (GPU) a captured, replayed step without host syncs."""

import pytest
import torch

from vramplan_kernels.dispatch import kernel_mode
from vramplan.train.optim import FusedAdamW8bit, FusedShardedAdamW8bit, eight_bit_adamw, fused_update_applies

SHAPES = [(16, 4096), (300, 16), (16, 300)]  # 8-bit state in bitsandbytes too; 4,800 values: not 256-aligned
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _params(device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.device) for p in params]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad.copy_(g)  # grads stay views of the flat gradient
    opt.step()
    opt.zero_grad()


def test_steps_as_bitsandbytes_flat_optimizer():
    """Three steps with a changing lr against bitsandbytes' flat 8-bit AdamW (its CPU backend): the
    first to fp32 rounding; then the states' codes differ where bitsandbytes' CPU quantizer does not
    pick the nearest code (tiny v), so the updates agree closely, not exactly."""
    start = [p.detach().clone() for p in _params()]
    ours_p, theirs_p = _params(), _params()
    ours = FusedAdamW8bit(ours_p, lr=1e-2, weight_decay=0.01)
    try:
        theirs = eight_bit_adamw(False)(theirs_p, lr=1e-2, weight_decay=0.01)
        with kernel_mode("triton"):
            for step in range(3):
                for opt in (ours, theirs):
                    opt.param_groups[0]["lr"] = 1e-2 / (step + 1)
                grads = _grads(ours_p, step)
                _step(ours, ours_p, grads)
                for p, g in zip(theirs_p, grads):
                    p.grad = g.clone()
                theirs.step()
                if step == 0:
                    for a, b in zip(ours_p, theirs_p):
                        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    except RuntimeError as e:
        pytest.skip(f"bitsandbytes 8-bit optimizers do not step on the CPU here: {e}")
    assert ours._lr.item() == pytest.approx(1e-2 / 3)
    for a, b, p0 in zip(ours_p, theirs_p, start):
        ours_moved, theirs_moved = (a - p0).detach(), (b - p0).detach()
        assert (ours_moved - theirs_moved).norm() < 0.02 * theirs_moved.norm()
    assert ours.state[ours.flat.param]["step"].item() == 3
    # the saved state is bitsandbytes' layout: theirs loads into ours
    fresh = FusedAdamW8bit(_params(), lr=1e-2)
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.state[fresh.flat.param]["absmax2"], theirs.state[theirs.flat.param]["absmax2"])
    assert fresh._step.item() == 3


def test_clipping_scales_the_gradient_on_the_device():
    clipped_p, manual_p = _params(), _params()
    clipped, manual = FusedAdamW8bit(clipped_p, lr=1e-2), FusedAdamW8bit(manual_p, lr=1e-2)
    grads = _grads(clipped_p, 7)
    for p, g in zip(clipped_p, grads):
        p.grad.copy_(g)
    norm = clipped.clip_grad_norm_(1.0)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(norm, want)
    clipped.step()
    _step(manual, manual_p, [g * (1.0 / (want + 1e-6)) for g in grads])
    for a, b in zip(clipped_p, manual_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert clipped._scale.item() == 1.0  # one step's scale only


def test_non_finite_gradient_skips_the_step():
    params = _params()
    opt = FusedAdamW8bit(params, lr=1e-2)
    _step(opt, params, _grads(params, 0))
    before = [p.detach().clone() for p in params]
    grads = _grads(params, 1)
    grads[1][0, 0] = float("inf")
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    assert not torch.isfinite(opt.clip_grad_norm_(1.0))
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_state_dict_round_trips_into_a_fresh_optimizer():
    """Stop after two steps, load the saved state (through torch.save) into a fresh optimizer: the
    next steps equal an uninterrupted run's, with the lr a scheduler sets."""
    import io

    def run(opt, params, steps):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        for step in steps:
            _step(opt, params, _grads(params, step))
            sched.step()
        return sched

    straight_p = _params()
    straight = FusedAdamW8bit(straight_p, lr=1e-2, weight_decay=0.01)
    run(straight, straight_p, range(4))
    first_p = _params()
    first = FusedAdamW8bit(first_p, lr=1e-2, weight_decay=0.01)
    sched = run(first, first_p, range(2))
    buf = io.BytesIO()
    torch.save({"opt": first.state_dict(), "sched": sched.state_dict()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in first_p]
    resumed = FusedAdamW8bit(resumed_p, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(resumed, lambda s: 1.0 / (1 + s))  # built before loading, as the recipe does
    buffers = [t.data_ptr() for t in resumed.state[resumed.flat.param].values()]
    resumed.load_state_dict(saved["opt"])
    assert [t.data_ptr() for t in resumed.state[resumed.flat.param].values()] == buffers  # loaded in place
    sched.load_state_dict(saved["sched"])
    for step in range(2, 4):
        _step(resumed, resumed_p, _grads(resumed_p, step))
        sched.step()
    for a, b in zip(straight_p, resumed_p):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other adapters"):
        FusedAdamW8bit([torch.nn.Parameter(torch.zeros(10))]).load_state_dict(saved["opt"])


def test_switch_picks_it_for_8bit_plans_only(monkeypatch):
    from vramplan.plan import Plan
    from vramplan.train import switches
    from vramplan.train.recipe import make_optimizer

    cpu = torch.device("cpu")
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    for name in ("adamw8bit", "paged_adamw8bit"):
        opt, note = make_optimizer(_params(), Plan(model="tiny", optimizer=name), 1e-3, 0.0, cpu)
        assert isinstance(opt, FusedAdamW8bit) and note is None
    assert isinstance(make_optimizer(_params(), Plan(model="tiny", optimizer="adamw"), 1e-3, 0.0, cpu)[0],
                      torch.optim.AdamW)
    fsdp = Plan(model="tiny", parallel="fsdp")  # FSDP2: the shards' own states, never paged (a note says so)
    opt, note = make_optimizer(_params(), fsdp, 1e-3, 0.0, cpu, sharded=True)
    assert isinstance(opt, FusedShardedAdamW8bit) and "not paged" in note
    opt, note = make_optimizer(_params(), fsdp.replace(cpu_offload=True), 1e-3, 0.0, cpu, sharded=True)
    assert isinstance(opt, torch.optim.AdamW) and "CPU offload" in note  # steps on the host
    assert not fused_update_applies(Plan(model="tiny", lora_dtype="bf16"))
    monkeypatch.delenv(switches.ENABLE_ENV)
    assert not isinstance(make_optimizer(_params(), Plan(model="tiny"), 1e-3, 0.0, cpu)[0], FusedAdamW8bit)
    opt, note = make_optimizer(_params(), fsdp, 1e-3, 0.0, cpu, sharded=True)
    assert isinstance(opt, torch.optim.AdamW) and "VRAMPLAN_ENABLE=fused_optimizer" in note


@pytest.mark.gpu
def test_captured_step_replays_with_a_new_lr_and_never_syncs():
    """The update captured once in a CUDA graph, replayed at two learning rates (set outside the
    graph, as step() does), equals eager steps; clipping plus step run with sync debug set to error."""
    device = torch.device("cuda")
    eager_p, graph_p = _params(device), _params(device)
    eager, graphed = FusedAdamW8bit(eager_p, lr=1e-2), FusedAdamW8bit(graph_p, lr=1e-2)
    grads = [_grads(eager_p, s) for s in range(3)]
    lrs = [1e-2, 3e-3, 1e-3]

    warm_p = _params(device)  # the first step builds the code maps on the device (a copy that syncs) and compiles
    warm = FusedAdamW8bit(warm_p, lr=1e-2)
    warm.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, lr in enumerate(lrs):
            eager.param_groups[0]["lr"] = lr
            for p, g in zip(eager_p, grads[step]):
                p.grad.copy_(g)
            eager.clip_grad_norm_(1.0)
            eager.step()
            eager.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    for p, g in zip(graph_p, grads[0]):
        p.grad.copy_(g)
    graphed.flat.gather_grads()
    graph = graphed.capture(max_norm=1.0)
    assert graphed._step.item() == 0 and not graphed.state[graphed.flat.param]["absmax1"].any()  # the warm-up wrote nothing
    for step, lr in enumerate(lrs):
        graphed.param_groups[0]["lr"] = lr
        graphed._lr.fill_(lr)  # what step() does before its update
        graphed.flat.grad.copy_(torch.cat([torch.nn.functional.pad(g.flatten(), (0, -g.numel() % 256))
                                           for g in grads[step]]))
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager_p, graph_p):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert graphed._step.item() == 3


# ---------------------------------------------------------------- FSDP2: states per local shard


def _saved(m: torch.Tensor, v: torch.Tensor, shards: list[int]) -> dict:
    """A whole saved state as FusedShardedAdamW8bit writes it: each shard of m and v blocked on its own."""
    from vramplan_kernels.adamw8bit import AdamW8bitState

    pieces, at = [], 0
    for size in shards:
        pieces.append(AdamW8bitState.quantized(m[at:at + size], v[at:at + size]))
        at += size
    return {"state1": torch.cat([q.m for q in pieces]), "absmax1": torch.cat([q.m_absmax for q in pieces]),
            "state2": torch.cat([q.v for q in pieces]), "absmax2": torch.cat([q.v_absmax for q in pieces]),
            "shards": torch.tensor(shards), "step": torch.tensor(3.0)}


def _nearest(values: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per value, its distance to the nearest code of its block (absmax per 256 values)."""
    from vramplan_kernels.adamw8bit import BLOCKSIZE, dynamic_map

    scale = absmax.repeat_interleave(BLOCKSIZE)[:values.numel()]
    return (dynamic_map(signed)[None, :] * scale[:, None] - values[:, None]).abs().amin(dim=1)


def test_shard_states_load_as_saved_where_blocks_match_and_within_a_code_step_where_not():
    """Saved by 2 ranks of 200 values (blocks 0-199 | 200-399): each rank's range loads its codes as
    saved; one rank's 0-399 (blocks 0-255 | 256-399) re-blocks through fp32, every value its nearest
    code again (one code step at most). Shards of 256 re-join on one rank bit for bit."""
    from vramplan.train.optim import local_state

    gen = torch.Generator().manual_seed(0)
    m, v = torch.randn(400, generator=gen) * 1e-3, torch.rand(400, generator=gen) * 1e-6
    saved = _saved(m, v, [200, 200])
    for start, stop in ((0, 200), (200, 400)):
        mine = local_state(saved, start, stop, 400, "cpu")
        assert torch.equal(mine.m, saved["state1"][start:stop]) and mine.m_absmax.numel() == 1
    pieces = [local_state(saved, a, a + 200, 400, "cpu").moments() for a in (0, 200)]
    old_m, old_v = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    whole = local_state(saved, 0, 400, 400, "cpu")
    assert whole.m_absmax.numel() == 2
    new_m, new_v = whole.moments()
    assert not torch.equal(new_m, old_m)  # re-blocked, not copied
    assert torch.all((new_m - old_m).abs() <= _nearest(old_m, whole.m_absmax, True) * (1 + 1e-6))
    assert torch.all((new_v - old_v).abs() <= _nearest(old_v, whole.v_absmax, False) * (1 + 1e-6))
    aligned = _saved(m[:384], v[:384], [256, 128])
    again = local_state(aligned, 0, 384, 384, "cpu")
    assert torch.equal(again.m, aligned["state1"]) and torch.equal(again.v_absmax, aligned["absmax2"])
    with pytest.raises(ValueError, match="other adapters"):
        local_state(saved, 0, 200, 512, "cpu")


def test_sharded_optimizer_on_whole_tensors_steps_as_the_flat_one():
    """One shard per parameter blocks as FlatLoRA's 256-aligned segments do: the same updates bit for
    bit (with one clipping scale: the norms agree to rounding), and its whole state dict loads into a fresh one that continues the same."""
    from vramplan.train.optim import FusedShardedAdamW8bit

    flat_p, shard_p = _params(), _params()
    flat, sharded = FusedAdamW8bit(flat_p, lr=1e-2, weight_decay=0.01), FusedShardedAdamW8bit(shard_p, lr=1e-2, weight_decay=0.01)
    for step in range(2):
        grads = _grads(flat_p, step)
        for p, g in zip(flat_p, grads):
            p.grad.copy_(g)
        for p, g in zip(shard_p, grads):
            p.grad = g.clone()
        torch.testing.assert_close(sharded.clip_grad_norm_(1.0), flat.clip_grad_norm_(1.0), rtol=1e-6, atol=0)
        sharded._scale.copy_(flat._scale)  # the norms sum in another order (per tensor): one scale for both
        flat.step()
        sharded.step()
        flat.zero_grad()
        sharded.zero_grad()
    for a, b in zip(flat_p, shard_p):
        assert torch.equal(a, b)
    saved = sharded.state_dict()
    assert [int(e["shards"][0]) for e in saved["state"].values()] == [p.numel() for p in shard_p]
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in shard_p]
    resumed = FusedShardedAdamW8bit(resumed_p, lr=1e-2)
    resumed.load_state_dict(saved)
    for opt, params in ((sharded, shard_p), (resumed, resumed_p)):
        for p, g in zip(params, _grads(params, 5)):
            p.grad = g
        opt.step()
    for a, b in zip(shard_p, resumed_p):
        assert torch.equal(a, b)


def test_one_gpu_fused_states_are_priced_in_the_pool_as_the_trainer_keeps_them(monkeypatch):
    """Switched on, a one-GPU paged 8-bit plan runs the fused optimizer, whose states are never paged:
    the planner prices them inside the GPU peak (with their absmax), as it prices the unpaged plan, and
    says so; switched off the paged states stay in managed memory, outside the peak. The trainer's
    choice and the planner's come from one predicate."""
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture, estimate_plan
    from vramplan.memory.adapters import lora_param_count, paged_params
    from vramplan.plan import Plan
    from vramplan.train import switches

    profile = resolve_model("llama-3.2-1b")
    paged = Plan(model="llama-3.2-1b", optimizer="paged_adamw8bit")
    trainable = lora_param_count(architecture(profile), paged.lora_rank, paged.lora_targets)
    monkeypatch.delenv(switches.ENABLE_ENV, raising=False)
    off = estimate_plan(paged, profile)
    assert not fused_update_applies(paged)
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    on = estimate_plan(paged, profile)
    assert fused_update_applies(paged) and not fused_update_applies(paged.replace(optimizer="adamw"))
    fused_bytes = 2 * (trainable + 4 * -(-trainable // 256))
    assert on.components["optimizer_states"] == fused_bytes
    # off, bitsandbytes keeps the states of the adapters under its paging size on the device (2 bytes each)
    paged_off = paged_params(architecture(profile), paged)
    assert off.components.get("optimizer_states", 0) == 2 * (trainable - paged_off)
    assert on.components["optimizer_states"] == fused_bytes
    assert any("not paged" in note for note in on.notes)
    assert estimate_plan(paged.replace(optimizer="adamw8bit"), profile).components["optimizer_states"] == fused_bytes


def test_only_plans_that_page_optimizer_states_pay_the_first_managed_allocation(monkeypatch):
    """A process's first CUDA managed allocation costs 128 MiB outside torch's pool (measured): a plan whose
    states bitsandbytes pages pays it; one stepped by the fused kernel, by torch AdamW or by the unpaged
    AdamW8bit, or whose adapters are all under bitsandbytes' paging size, does not."""
    from vramplan.catalog import resolve_model
    from vramplan.estimate import estimate_plan
    from vramplan.memory.overhead import MANAGED_FIRST_ALLOCATION_BYTES
    from vramplan.plan import Plan
    from vramplan.train import switches

    profile = resolve_model("llama-3.2-1b")
    paged = Plan(model="llama-3.2-1b", optimizer="paged_adamw8bit")
    monkeypatch.delenv(switches.ENABLE_ENV, raising=False)
    libraries = lambda plan: estimate_plan(plan, profile).components["cuda_libraries"]  # noqa: E731
    with_managed = libraries(paged)
    for unpaged in (paged.replace(optimizer="adamw"), paged.replace(optimizer="adamw8bit"), paged.replace(lora_rank=8)):
        assert libraries(unpaged) == with_managed - MANAGED_FIRST_ALLOCATION_BYTES, unpaged
    monkeypatch.setenv(switches.ENABLE_ENV, "fused_optimizer")
    assert libraries(paged) == with_managed - MANAGED_FIRST_ALLOCATION_BYTES
    hf = estimate_plan(paged.replace(stack="hf", loss="full"), profile).components["cuda_libraries"]
    assert estimate_plan(paged.replace(stack="hf", loss="full", optimizer="adamw"), profile).components["cuda_libraries"] == hf


def test_bitsandbytes_pages_only_states_of_large_adapters():
    """Its paging size (1e5 elements): Llama-3.2-1B's rank-16 adapters of the 8,192-wide MLP (131,072) are paged
    and the rest kept on the device; Qwen3-0.6B's (at most 3,072 × 16) and Llama's at rank 8 are none paged."""
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture
    from vramplan.memory.adapters import PAGED_MIN_NUMEL, lora_tensor_numels, paged_params, trainable_params
    from vramplan.plan import Plan

    llama = architecture(resolve_model("llama-3.2-1b"))
    plan = Plan(model="llama-3.2-1b", optimizer="paged_adamw8bit")
    numels = lora_tensor_numels(llama, 16, plan.lora_targets)
    assert sum(numels) == trainable_params(llama, plan)
    assert paged_params(llama, plan) == sum(n for n in numels if n >= PAGED_MIN_NUMEL) > 0
    assert 0 < paged_params(llama, plan) < trainable_params(llama, plan) == paged_params(llama, plan, flat=True)
    assert paged_params(llama, plan.replace(lora_rank=8)) == 0
    qwen = architecture(resolve_model("qwen3-0.6b"))
    assert paged_params(qwen, Plan(model="qwen3-0.6b")) == 0
    # an MoE's fused expert pairs are tensors of their own: every one counted once, as lora_param_count counts them
    from vramplan.memory.adapters import lora_param_count
    from vramplan.plan import EXPERT_TARGETS

    moe = architecture(resolve_model("qwen3-30b-a3b"))
    targets = Plan(model="qwen3-30b-a3b").lora_targets + tuple(EXPERT_TARGETS)
    assert sum(lora_tensor_numels(moe, 16, targets)) == lora_param_count(moe, 16, targets)
    from vramplan.estimate import estimate_plan

    notes = estimate_plan(Plan(model="qwen3-0.6b", optimizer="paged_adamw8bit"), resolve_model("qwen3-0.6b")).notes
    assert any("pages none of these adapters' states" in n for n in notes)
    assert not any("CUDA managed memory" in n for n in notes)


@pytest.mark.parametrize("switch", ["fused_optimizer", "flat_optimizer"])
def test_flat_stepped_adapters_are_made_in_the_buffer_the_optimizer_keeps(tmp_path, monkeypatch, switch):
    """Where the trainer steps the adapters as one flat tensor, the loader makes them as views of one
    buffer before the layers (``AdapterArena``) and the optimizer adopts it without a copy: the adapters
    start with the values the per-tensor plan gives them, and train to the same loss."""
    from train_fixtures import build_model, llama_config
    from vramplan.plan import Plan
    from vramplan.train import model as loader
    from vramplan.train import switches
    from vramplan.train.loss import summed_loss
    from vramplan.train.model import load_for_training, lora_parameters
    from vramplan.train.recipe import make_optimizer

    monkeypatch.setenv(switches.ENABLE_ENV, switch)
    made_in_arena = loader.adapter_arena

    folder = build_model(llama_config(), tmp_path / "llama")
    plan = Plan(model="tiny", quant="nf4", lora_rank=4, seq_len=24, optimizer="adamw8bit")
    ids = torch.randint(4, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "position_ids": torch.arange(24)[None]}
    runs = {}
    for arena in (False, True):  # the same plan and optimizer, the adapters made one by one or in the arena
        monkeypatch.setattr(loader, "adapter_arena", made_in_arena if arena else lambda *args: None)
        torch.manual_seed(0)
        model, _ = load_for_training(folder, plan, torch.device("cpu"))
        params = lora_parameters(model)
        storages = {p.untyped_storage().data_ptr() for p in params}
        assert (len(storages) == 1) == arena
        before = [p.detach().clone() for p in params]
        optimizer, _ = make_optimizer(params, plan, 1e-2, 0.0, torch.device("cpu"), flat=switch == "flat_optimizer")
        # one flat tensor either way; adopted, it is the buffer the adapters were made in
        held = optimizer.flat.param
        assert (held.untyped_storage().data_ptr() == storages.pop()) == arena
        losses = []
        for _ in range(3):
            loss, _ = summed_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[arena] = (before, losses)
    for a, b in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(a, b)
    assert runs[True][1] == runs[False][1]
