"""Each memory component against values computed by hand."""

import pytest

from vramplan.arch import from_config
from vramplan.catalog import resolve_model
from vramplan.memory.activations import attention_scores_bytes, checkpoint_bytes, per_layer_input_bytes, shared_kv_bytes
from vramplan.memory.adapters import lora_param_count
from vramplan.memory.logits import chunked_logits_bytes, full_logits_peak_bytes, loss_chunk_tokens
from vramplan.memory.optimizer import optimizer_state_bytes
from vramplan.memory.overhead import (CAPTURED_FRAGMENTATION_FLOOR_BYTES, UNFITTED_EAGER_FRAGMENTATION_BYTES,
                                      EAGER_FRAGMENTATION_FLOOR_BYTES,
                                      pooled_fragmentation_bytes,
                                      unreused_segment_bytes)
from vramplan.memory.peak import assemble
from vramplan.memory.weights import int8_weight_bytes, nf4_weight_bytes
from vramplan.plan import ALL_LINEAR

LLAMA = from_config(resolve_model("llama-3.2-1b").config)
GEMMA = from_config(resolve_model("gemma-4-e2b-text").config)


def test_nf4_bits_per_weight():
    n = 64 * 256 * 1000
    assert nf4_weight_bytes(n, double_quant=False) == n // 2 + (n // 64) * 4  # 4.5 bits
    dq = nf4_weight_bytes(n, double_quant=True)
    assert dq == n // 2 + n // 64 + 1000 * 4 + 4
    assert dq * 8 / n == pytest.approx(4.127, abs=0.002)


def test_int8_has_a_scale_per_row():
    assert int8_weight_bytes(4096 * 1024, rows=4096) == 4096 * 1024 + 4 * 4096


def test_lora_params_llama_1b_rank_16():
    per_layer = 16 * ((2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3)
    assert lora_param_count(LLAMA, 16, ALL_LINEAR) == 16 * per_layer == 11_272_192


def test_lora_skips_missing_kv_on_shared_layers():
    shared = [layer for layer in GEMMA.layers if not layer.has_kv]
    assert shared and all("k_proj" not in {lin.name for lin in layer.linears} for layer in shared)
    only_kv = lora_param_count(GEMMA, 8, ("k_proj",))
    expected = sum(8 * (1536 + layer.kv_dim) for layer in GEMMA.layers if layer.has_kv)
    assert only_kv == expected


def test_optimizer_state_bytes():
    assert optimizer_state_bytes(1000, "adamw") == 8000
    assert optimizer_state_bytes(1000, "paged_adamw8bit") == 2000
    assert optimizer_state_bytes(1000, "adamw", master_weights=True) == 12000


def test_full_logits_copies():
    t, v = 2048, 128256
    assert full_logits_peak_bytes(t, v, 4, softcap=False) == 4 * t * v * 4  # logits, log-softmax, two grads
    assert full_logits_peak_bytes(t, v, 4, softcap=True) == 5 * t * v * 4  # + tanh's saved output
    assert full_logits_peak_bytes(t, v, 2, softcap=False) == t * v * 2 + 3 * t * v * 4


def test_chunked_loss_never_builds_full_logits():
    t, v, h = 4096, 262144, 1536
    chunk = loss_chunk_tokens(t, v)
    assert chunk == 256 and chunk * v * 2 <= 128 * 2**20  # a multiple of 128 bf16 rows within 128 MiB
    assert loss_chunk_tokens(t, v, budget=256 * 2**20) == 512  # a plan's loss_chunk_mb=256, as measured before
    assert chunked_logits_bytes(t, v, h) == chunk * v * 2 + t * h * 2 + t * 4
    assert chunked_logits_bytes(t, v, h) < t * v * 4 / 7


def test_chunk_rule_matches_the_kernel():
    from vramplan.memory import logits
    from vramplan_kernels import linear_cross_entropy as kernel
    import torch

    assert logits.CHUNK_BUDGET_BYTES == kernel.LOGITS_CHUNK_BYTES
    for tokens, vocab in [(8192, 262144), (2048, 128256), (100, 151936), (4096, 1000)]:
        assert logits.loss_chunk_tokens(tokens, vocab) == kernel.default_chunk_size(tokens, vocab, torch.bfloat16)


def test_activation_pieces():
    assert checkpoint_bytes(16, 2048, 2048, 2) == 16 * 2048 * 2048 * 2
    layer = LLAMA.layers[0]
    assert attention_scores_bytes(layer, 1, 2048, 4) == 32 * 2048 * 2048 * 4
    assert per_layer_input_bytes(GEMMA, 2048, 2, copies=1) == 2048 * 35 * 256 * 2
    # E2B stores K/V of its last sliding layer (kv 256) and its last full layer (kv 512)
    assert shared_kv_bytes(GEMMA, 2048, 2) == 2 * 2048 * (256 + 512) * 2
    assert shared_kv_bytes(LLAMA, 2048, 2) == 0


def test_fragmentation_rules():
    assert unreused_segment_bytes(10, 5, 3, allocated_peak=15) == 3
    assert unreused_segment_bytes(10, 5, 3, allocated_peak=20) == 0
    assert pooled_fragmentation_bytes(1000) == UNFITTED_EAGER_FRAGMENTATION_BYTES  # a process the floor was not fitted on
    assert pooled_fragmentation_bytes(1000, small_gradients=0) == EAGER_FRAGMENTATION_FLOOR_BYTES  # the fitted floor
    # eager: the small pool's gradients made after the step's peak, byte for byte
    assert pooled_fragmentation_bytes(1000, small_gradients=10**8) == EAGER_FRAGMENTATION_FLOOR_BYTES + 10**8
    assert pooled_fragmentation_bytes(1000, captured=True, small_gradients=10**8) == CAPTURED_FRAGMENTATION_FLOOR_BYTES
    assert pooled_fragmentation_bytes(10 * 10**9) == 500_000_000  # 5% of large transients
    # a captured step's eager prologue: its cached blocks count where they exceed the floor, never eagerly
    assert pooled_fragmentation_bytes(1000, captured=True, prologue=10**6) == 129_000_000
    assert pooled_fragmentation_bytes(1000, captured=True, prologue=3 * 10**8) == 3 * 10**8
    assert pooled_fragmentation_bytes(1000, prologue=3 * 10**8, small_gradients=0) == EAGER_FRAGMENTATION_FLOOR_BYTES


def test_a_captured_prologue_holds_the_lookups_and_their_scaled_copies():
    """Gemma-4-E2B at 8,192 tokens: the embeddings (1,536 wide) and the per-layer rows (35 layers of 256), each
    looked up and scaled, so two of the rows at once beside the embeddings: 319 MB. Llama does not scale its one
    lookup: 33.6 MB. Priced into E2B's captured slack from about 4,096 tokens, never into Llama's at any length."""
    from vramplan.estimate import estimate_plan
    from vramplan.memory.activations import captured_prologue_bytes
    from vramplan.plan import Plan

    tokens = 8192
    assert captured_prologue_bytes(GEMMA, tokens, 2) == tokens * 1536 * 2 + 2 * tokens * 35 * 256 * 2
    assert captured_prologue_bytes(LLAMA, tokens, 2) == tokens * 2048 * 2

    def slack(model, seq):
        return estimate_plan(Plan(model=model, seq_len=seq, cuda_graphs=True), resolve_model(model)).components["fragmentation"]
    assert slack("gemma-4-e2b-text", 8192) - slack("gemma-4-e2b-text", 2048) == captured_prologue_bytes(GEMMA, 8192, 2) \
        - 129_000_000
    assert slack("llama-3.2-1b", 8192) == slack("llama-3.2-1b", 2048)

    def notes(model, seq):
        return estimate_plan(Plan(model=model, seq_len=seq, cuda_graphs=True), resolve_model(model)).notes
    assert any("per-layer rows eagerly: 0.32 GB" in n for n in notes("gemma-4-e2b-text", 8192))
    assert not any("eagerly:" in n for n in notes("gemma-4-e2b-text", 2048) + notes("llama-3.2-1b", 8192))


def test_peak_is_max_over_phases_not_a_sum():
    phases = {"load": {"w": 5}, "forward": {"w": 5, "a": 3}, "backward": {"w": 5, "a": 4, "g": 1}, "optimizer_step": {"w": 5, "o": 2}}
    name, parts, totals = assemble(phases, {"cuda_context": 1}, {"fragmentation": 2})
    assert name == "backward" and sum(parts.values()) == 13 and totals["load"] == 6


def test_in_place_glu_backward_adds_one_intermediate_not_two():
    from vramplan.memory.activations import mlp_backward_transient_bytes_per_token

    layer = LLAMA.layers[0]  # intermediate 8192
    assert mlp_backward_transient_bytes_per_token(layer, 2) == 2 * 8192 * 2
    assert mlp_backward_transient_bytes_per_token(layer, 2, inplace_glu_backward=True) == 8192 * 2


def test_step_buffers_the_trainer_keeps_from_its_first_matmul():
    """cuBLAS workspaces of two threads (32 MiB + 1 MiB each on Hopper) and, for NF4, one bf16 copy of the
    largest linear that is not fused (Llama-3.2-1B above 64 tokens: gate/up/down, 8192 × 2048)."""
    from vramplan.estimate import estimate_plan
    from vramplan.memory.overhead import cublas_workspace_bytes
    from vramplan.memory.weights import dequant_buffer_bytes
    from vramplan.plan import Plan

    assert cublas_workspace_bytes() == 2 * 33 * 2**20
    assert dequant_buffer_bytes(LLAMA, "nf4", 2048) == 2 * 8192 * 2048
    # up to 64 tokens weights of 2^24 elements or more run fused, with no buffer; Llama-3.2-1B's (16.8M
    # elements: 8192 x 2048 = 2^24) all do, its attention projections (4.2M and smaller) do not
    assert dequant_buffer_bytes(LLAMA, "nf4", 64) == 2 * 2048 * 2048 and dequant_buffer_bytes(LLAMA, "bf16", 2048) == 0
    assert dequant_buffer_bytes(LLAMA, "nf4", 65) == 2 * 8192 * 2048
    est = estimate_plan(Plan(model="llama-3.2-1b"), resolve_model("llama-3.2-1b"))
    assert est.components["dequant_buffer"] == 2 * 8192 * 2048 and est.components["cublas_workspaces"] == 2 * 33 * 2**20
    hf = estimate_plan(Plan(model="llama-3.2-1b", stack="hf", loss="full"), resolve_model("llama-3.2-1b"))
    assert "dequant_buffer" not in hf.components


def test_fp32_adapters_bf16_copies_are_held_through_the_step():
    """fp32 adapters are cast to bf16 once a step and the copies held to the next optimizer step (``LoRACopies``; each
    CUDA graph casts its own and keeps them for its replays): 2 bytes a trainable parameter, captured or eager. bf16
    adapters (no copy to make) carry none."""
    from vramplan.estimate import estimate_plan
    from vramplan.plan import Plan
    from vramplan.stacks.vramplan import trainable_params
    from vramplan.estimate import architecture

    profile = resolve_model("llama-3.2-1b")
    captured = Plan(model="llama-3.2-1b", lora_rank=128)
    assert captured.captures_steps
    trainable = trainable_params(architecture(profile), captured)
    for plan in (captured, captured.replace(cuda_graphs=False)):
        assert estimate_plan(plan, profile).components["lora_compute_copies"] == 2 * trainable
    assert "lora_compute_copies" not in estimate_plan(captured.replace(lora_dtype="bf16"), profile).components


def test_an_eager_backward_lets_checkpoints_go_as_gradients_come():
    """An eager step of one micro-batch makes each layer's adapter gradients as it lets that layer's checkpoint go, so
    its backward peaks at its start or its end, never with both whole: at rank 256 (0.72 GB of gradients for 0.13 of
    checkpoints at 2,048 tokens) the backward holds the gradients and a layer's working set, not the checkpoints too.
    Accumulating micro-batches hold the gradients from the first on, so they price both (as captured steps do)."""
    from vramplan.estimate import architecture
    from vramplan.plan import Plan
    from vramplan.stacks.vramplan import step_memory

    arch = architecture(resolve_model("llama-3.2-1b"))
    for rank in (16, 256):
        eager = Plan(model="llama-3.2-1b", lora_rank=rank, cuda_graphs=False)
        one, accumulating = step_memory(arch, eager), step_memory(arch, eager.replace(grad_accum=4))
        grads = one.phases["backward"]["lora_grads"]
        checkpoints = one.phases["forward"]["activations"]
        layer_set = accumulating.phases["backward"]["activations"] - checkpoints
        assert accumulating.phases["backward"]["lora_grads"] == grads
        assert one.phases["backward"]["activations"] == max(checkpoints - grads, 0) + layer_set
        assert (grads > checkpoints) == (rank == 256)


def test_fused_token_limit_matches_the_kernel():
    from vramplan.memory import weights
    from vramplan_kernels import qlora_linear

    assert weights.FUSED_MAX_TOKENS == qlora_linear.FUSED_MAX_TOKENS
    assert weights.FUSED_MIN_WEIGHT == qlora_linear.FUSED_MIN_WEIGHT
