"""What each stack does with a plan: the modelled behaviour, component by component."""

import subprocess
import sys

from vramplan.arch import from_config
from vramplan.catalog import resolve_model
from vramplan.estimate import estimate_plan
from vramplan.plan import Plan
from vramplan.stacks.hf import attention_kernel

LLAMA = resolve_model("llama-3.2-1b")
GEMMA = resolve_model("gemma-4-e2b-text")


def _est(profile, **kw):
    return estimate_plan(Plan(model=profile.name, **kw), profile)


def test_planner_does_not_import_torch():
    code = "import sys, vramplan.estimate, vramplan.fit, vramplan.cli.cmd_plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_components_sum_to_peak_and_context_is_named():
    est = _est(GEMMA)
    assert sum(est.components.values()) == est.peak_bytes == est.phases[est.peak_phase]
    assert est.components["cuda_context"] > 0
    assert set(est.to_dict()) >= {"peak_bytes", "fits", "components", "plan", "phases", "peak_phase"}


def test_hf_attention_kernels_follow_sdpa_rules():
    llama = from_config(LLAMA.config).layers[0]
    assert attention_kernel(llama, 4, "sdpa") == "math"  # fp32 + GQA: no flash, no efficient
    assert attention_kernel(llama, 2, "sdpa") == "flash"
    sliding = from_config(GEMMA.config).layers[0]
    assert sliding.attention == "sliding" and attention_kernel(sliding, 4, "sdpa") == "efficient"


def test_hf_upcasts_embeddings_to_fp32_on_kbit_only():
    nf4 = _est(LLAMA, stack="hf", loss="full").components["embeddings"]
    bf16 = _est(LLAMA, stack="hf", loss="full", quant="bf16").components["embeddings"]
    assert nf4 == 2 * bf16 == 128256 * 2048 * 4


def test_hf_notes_what_it_cannot_do():
    est = _est(LLAMA, stack="hf", checkpointing="offload", loss="chunked", lora_dtype="bf16")
    assert len(est.notes) == 4 and any("paged optimizer states" in n for n in est.notes)
    assert est.peak_bytes == _est(LLAMA, stack="hf", checkpointing="full", loss="full").peak_bytes


def test_vramplan_keeps_per_layer_tables_on_cpu_and_sends_rows():
    est = _est(GEMMA)
    assert "per_layer_embeddings" not in est.components
    assert est.phases["backward"] >= est.components.get("per_layer_inputs", 0) > 0
    hf = _est(GEMMA, stack="hf", loss="full")
    assert hf.components["per_layer_embeddings"] == 35 * 262144 * 256 * 4


def test_vramplan_offload_chunked_and_master_weights():
    full, offload = _est(LLAMA, checkpointing="full"), _est(LLAMA, checkpointing="offload")
    assert offload.components["activations"] < full.components["activations"]
    assert _est(LLAMA, loss="chunked").peak_bytes < _est(LLAMA, loss="full").peak_bytes
    fp32, bf16 = _est(LLAMA, optimizer="adamw"), _est(LLAMA, optimizer="adamw", lora_dtype="bf16")
    assert bf16.components["lora_params"] * 2 == fp32.components["lora_params"]
    assert bf16.components["optimizer_states"] == fp32.components["optimizer_states"] * 12 // 8


def test_eager_attention_costs_quadratic_memory():
    sdpa, eager = _est(LLAMA, seq_len=4096), _est(LLAMA, seq_len=4096, attention="eager")
    assert eager.peak_bytes - sdpa.peak_bytes > 32 * 4096 * 4096 * 2  # at least one bf16 copy of the scores


def test_towers_only_on_gpu_when_the_plan_uses_them():
    text = GEMMA.config
    nested = {"model_type": "gemma4", "text_config": text,
              "vision_config": {"model_type": "gemma4_vision", "hidden_size": 768, "num_hidden_layers": 16,
                                "intermediate_size": 3072, "patch_size": 16}}
    from vramplan.catalog import ModelProfile

    profile = ModelProfile(name="gemma-4-e2b", config=nested)
    assert "towers" not in estimate_plan(Plan(model="gemma-4-e2b"), profile).components
    with_vision = estimate_plan(Plan(model="gemma-4-e2b", modalities=("text", "image")), profile)
    assert with_vision.components["towers"] > 0


def test_paged_optimizer_states_stay_outside_the_gpu_peak():
    """bitsandbytes' paged states are CUDA managed memory: left out of the peak, named in the notes; it pages
    only adapters of 1e5 elements and up, so the smaller ones' states stay counted (Llama-3.2-1B at rank 128:
    k/v's B, 512 × 128). The same states unpaged (adamw8bit) are torch tensors and counted, and vramplan's
    trainer then makes no managed allocation, so its 128 MiB is not priced either."""
    from vramplan.estimate import architecture
    from vramplan.memory.adapters import PAGED_MIN_NUMEL, lora_tensor_numels
    from vramplan.memory.optimizer import resident_paged_state_bytes
    from vramplan.memory.overhead import MANAGED_FIRST_ALLOCATION_BYTES

    arch = architecture(LLAMA)
    numels = lora_tensor_numels(arch, 128, _est(LLAMA).plan.lora_targets)
    small = sum(n for n in numels if n < PAGED_MIN_NUMEL)
    assert 0 < small < sum(numels)
    for stack in ("vramplan", "hf"):
        loss = "full" if stack == "hf" else "chunked"
        paged = _est(LLAMA, stack=stack, loss=loss, lora_rank=128)
        plain = _est(LLAMA, stack=stack, loss=loss, lora_rank=128, optimizer="adamw8bit")
        states = plain.components["optimizer_states"]
        assert states == 2 * 128 * sum(lin.d_in + lin.d_out for layer in arch.layers for lin in layer.linears)
        managed = states - 2 * small
        assert paged.components["optimizer_states"] == 2 * small
        library = MANAGED_FIRST_ALLOCATION_BYTES if stack == "vramplan" else 0
        # NVML counts the states on the GPU in 128 MiB chunks; the first is in vramplan's libraries' allowance
        resident = paged.components["paged_states_resident"]
        assert resident == resident_paged_state_bytes(managed) > 0
        assert plain.peak_bytes - paged.peak_bytes == managed - library - resident
        assert any(f"{managed / 1e9:.2f} GB in CUDA managed memory" in n for n in paged.notes)
        assert not any("managed memory" in n for n in plain.notes)
