"""The plan search: objective order, budget with margin, explanation, impossible budgets."""

import time

import pytest

from vramplan.catalog import list_gpus, resolve_gpu, resolve_model
from vramplan.errors import VramplanError
from vramplan.estimate import DRIVER_RESERVE_BYTES, budget_bytes, estimate_plan
from vramplan.fit import fit_plan, leanest_plan, safety_margin, smallest_gpu_for
from vramplan.memory.overhead import CUDA_GRAPH_BYTES
from vramplan.plan import Plan

GEMMA = resolve_model("gemma-4-e2b-text")
LLAMA = resolve_model("llama-3.2-1b")


def test_catalog_budget_keeps_driver_reserve():
    gpu = resolve_gpu("rtx-4060")
    assert budget_bytes(gpu) == gpu.memory_bytes - DRIVER_RESERVE_BYTES
    assert budget_bytes(resolve_gpu("12GB")) == 12 * 10**9


def test_fit_keeps_seq_and_fits_with_margin():
    result = fit_plan(GEMMA, resolve_gpu("rtx-4060"), base=Plan(model=GEMMA.name, seq_len=2048))
    assert result.plan.seq_len == 2048
    assert result.estimate.peak_bytes <= result.budget_bytes - safety_margin(result.budget_bytes)
    assert result.explanation and "2048" in result.explanation[0]


def test_tight_budget_trades_precision_not_sequence():
    result = fit_plan(GEMMA, budget=4 * 10**9, base=Plan(model=GEMMA.name, seq_len=2048))
    assert result.plan.seq_len == 2048 and result.plan.quant == "nf4"
    assert any("bf16 needs at least" in line for line in result.explanation)
    # the next-better choice really does not fit
    limit = result.budget_bytes - result.margin_bytes
    if result.plan.lora_rank < 64:
        better = estimate_plan(result.plan.replace(lora_rank=result.plan.lora_rank * 2), GEMMA)
        assert better.peak_bytes > limit


def test_a_gpu_without_bf16_gets_an_fp16_plan_and_is_told_why():
    """T4, V100 and RTX 20xx have no bf16 arithmetic: fit plans fp16 compute there (the same bytes, as buy prices
    it), says so, and leaves bf16 to GPUs that have it; the trainer refuses a bf16 plan on such a GPU."""
    from vramplan.gpu import has_bf16_arithmetic
    from vramplan.train.model import check_arithmetic

    t4 = fit_plan(LLAMA, resolve_gpu("t4"))
    assert t4.plan.compute_dtype == "fp16" and any("Computes in fp16" in line and "T4" in line for line in t4.explanation)
    ada = fit_plan(LLAMA, resolve_gpu("rtx-4060"))
    assert ada.plan.compute_dtype == "bf16" and not any("fp16" in line for line in ada.explanation)
    assert fit_plan(LLAMA, resolve_gpu("2xv100-32gb")).plan.compute_dtype == "fp16"
    assert [has_bf16_arithmetic(major) for major in (7, 8, 9)] == [False, True, True]
    with pytest.raises(VramplanError, match=r"compute capability 7\.x.*compute_dtype.*fp16"):
        check_arithmetic(ada.plan, 7)
    check_arithmetic(t4.plan, 7)
    check_arithmetic(ada.plan, 8)


def test_effective_batch_is_kept():
    result = fit_plan(LLAMA, budget=6 * 10**9, base=Plan(model=LLAMA.name, seq_len=2048, micro_batch=8, stack="hf"))
    assert result.plan.effective_batch == 8
    assert result.plan.checkpointing in ("none", "full")  # hf has no offload


def test_impossible_budget_names_shortfall_and_gpu():
    with pytest.raises(VramplanError) as err:
        fit_plan(GEMMA, budget=1 * 10**9, base=Plan(model=GEMMA.name, seq_len=2048))
    message = str(err.value)
    needed = estimate_plan(leanest_plan(Plan(model=GEMMA.name, seq_len=2048), 2048), GEMMA).peak_bytes
    smallest = smallest_gpu_for(needed)
    assert "more than" in message and f"is {smallest.name} (" in message and "\n" not in message
    # no catalog GPU with less memory would hold it
    assert all(g.memory_bytes >= smallest.memory_bytes for g in list_gpus()
               if budget_bytes(g) - safety_margin(budget_bytes(g)) >= needed)


def test_search_is_fast():
    start = time.perf_counter()
    for budget in (3 * 10**9, 5 * 10**9, 24 * 10**9):
        for stack in ("vramplan", "hf"):
            try:
                fit_plan(GEMMA, budget=budget, base=Plan(model=GEMMA.name, seq_len=4096, micro_batch=4, stack=stack))
            except VramplanError:
                pass
    assert (time.perf_counter() - start) / 6 < 1.0


def test_fit_only_chooses_quantizations_the_stack_can_run():
    # an 8 GB card where bf16 does not fit: the vramplan trainer has no int8 path, the hf recipe does
    for stack, allowed in (("vramplan", {"bf16", "nf4"}), ("hf", {"bf16", "int8", "nf4"})):
        for budget in (6e9, 8e9, 12e9, 20e9):
            try:
                result = fit_plan(GEMMA, budget=int(budget), base=Plan(model=GEMMA.name, seq_len=1024, stack=stack))
            except VramplanError:
                continue
            assert result.plan.quant in allowed


def test_fit_replays_cuda_graphs_when_they_fit_and_gives_them_up_before_rank():
    """Graphs cost a measured constant; a budget that holds a plan only without them gets the same
    plan, eager, and the explanation says what the graphs would have needed."""
    profile = resolve_model("llama-3.2-1b")
    roomy = fit_plan(profile, resolve_gpu("rtx-4060"))
    assert roomy.plan.captures_steps
    assert any("CUDA graphs (without them" in line for line in roomy.explanation)
    # the leanest plan at the chosen precision and rank that graphs can hold, with and without them
    lean = roomy.plan.replace(checkpointing="full", optimizer="paged_adamw8bit", micro_batch=1, mlp_tiles=4)
    captured = estimate_plan(lean, profile)
    graphs_on = captured.peak_bytes
    eager = estimate_plan(lean.replace(cuda_graphs=False), profile).peak_bytes
    assert CUDA_GRAPH_BYTES == 100_000_000  # measured, less the leak those runs had (overhead.py)
    eager_estimate = estimate_plan(lean.replace(cuda_graphs=False), profile)
    # and the slack their first eager pass leaves in the regular pool, and the checkpoints an eager backward lets go
    # as its gradients come (a captured step's gradients are one buffer from its start)
    assert graphs_on - eager == (CUDA_GRAPH_BYTES
                                 + captured.components["fragmentation"] - eager_estimate.components["fragmentation"]
                                 + captured.components["activations"] - eager_estimate.components["activations"])
    budget = int((eager + graphs_on) / 2 / (1 - 0.05))  # between the two, after the safety margin
    tight = fit_plan(profile, budget=budget, base=Plan(model=profile.name))
    assert not tight.plan.cuda_graphs
    assert (tight.plan.quant, tight.plan.lora_rank) == (roomy.plan.quant, roomy.plan.lora_rank)
    assert any("no CUDA graphs (with them" in line for line in tight.explanation)
    # an offloaded-checkpoint plan cannot be captured, and the plan file says nothing new for graphs
    assert not roomy.plan.replace(checkpointing="offload").captures_steps
    assert "cuda_graphs" not in roomy.plan.to_dict()


def test_eight_bit_candidates_try_the_flat_step_first_where_the_model_takes_it():
    from vramplan.estimate import architecture
    from vramplan.fit import _candidates

    base = Plan(model="llama-3.2-1b")
    plans = list(_candidates(base, 2048, 1, architecture(resolve_model("llama-3.2-1b"))))
    eight_bit = [p for p in plans if p.optimizer != "adamw"]
    assert eight_bit and all(p.flat_optimizer for p in eight_bit[::2]) and not any(p.flat_optimizer for p in eight_bit[1::2])
    assert not any(p.flat_optimizer for p in plans if p.optimizer == "adamw")  # torch AdamW: nothing to flatten
    gemma = architecture(resolve_model("gemma-4-e2b"))  # a family the trainer does not step flat
    assert not any(p.flat_optimizer for p in _candidates(base.replace(model="gemma-4-e2b"), 2048, 1, gemma))


def test_the_flat_step_is_priced_only_where_the_trainer_takes_it():
    from vramplan.memory.adapters import lora_param_count

    llama, gemma = resolve_model("llama-3.2-1b"), resolve_model("gemma-4-e2b")
    plan = Plan(model="llama-3.2-1b", flat_optimizer=True)
    est = estimate_plan(plan, llama)
    trainable = lora_param_count(__import__("vramplan.estimate", fromlist=["architecture"]).architecture(llama),
                                 plan.lora_rank, plan.lora_targets)
    assert est.components["flat_optimizer"] == 250_000_000 + 4 * trainable
    assert "flat_optimizer" not in estimate_plan(plan.replace(optimizer="adamw"), llama).components
    assert "flat_optimizer" not in estimate_plan(Plan(model="gemma-4-e2b", flat_optimizer=True), gemma).components
    assert "flat_optimizer" not in Plan(model="x").to_dict() and Plan(model="x", flat_optimizer=True).to_dict()["flat_optimizer"]


def test_an_offloaded_plan_says_what_checkpoints_on_the_gpu_would_need():
    """Offloading is chosen over checkpoints kept on the GPU only when those do not fit: the explanation
    gives both faster modes' peaks, each over the usable memory."""
    profile = resolve_model("gemma-4-31b")
    result = fit_plan(profile, budget=20 * 10**9, base=Plan(model=profile.name, seq_len=2048))
    assert result.plan.checkpointing == "offload"
    line = next(line for line in result.explanation if line.startswith("Fastest settings"))
    on_gpu = estimate_plan(result.plan.replace(checkpointing="full"), profile).peak_bytes
    assert f"on the GPU: {on_gpu / 1e9:.2f} GB" in line and "none: " in line
    assert on_gpu > result.estimate.peak_bytes
