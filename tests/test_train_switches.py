from vramplan.train import switches


def test_defaults_and_environment(monkeypatch):
    monkeypatch.delenv(switches.DISABLE_ENV, raising=False)
    monkeypatch.delenv(switches.ENABLE_ENV, raising=False)
    assert switches.enabled("rope") and not switches.enabled("flat_optimizer")
    monkeypatch.setenv(switches.ENABLE_ENV, "flat_optimizer")
    monkeypatch.setenv(switches.DISABLE_ENV, "rope")
    assert not switches.enabled("rope") and switches.enabled("flat_optimizer")


def test_measured_choices_per_architecture(tmp_path, monkeypatch):
    """Gemma 4 keeps the per-tensor optimizer step and transformers' RoPE (measured slower fused);
    Llama gets the Triton RoPE, and the flat step where it is switched on."""
    import torch

    from train_fixtures import build_model, gemma4_config, llama_config
    from vramplan.train.model import load_base_model
    from vramplan.train.optim import flat_update_pays
    from vramplan.train.patching import ROPE_PATCHED_BY_DEFAULT

    llama = load_base_model(build_model(llama_config(), tmp_path / "l"), torch.float32)
    gemma = load_base_model(build_model(gemma4_config(), tmp_path / "g"), torch.float32)
    monkeypatch.delenv(switches.ENABLE_ENV, raising=False)
    assert not flat_update_pays(llama)
    from vramplan.plan import Plan

    flat_plan = Plan(model="tiny", flat_optimizer=True)  # the plan asks: the trainer steps flat, but not Gemma 4
    assert flat_update_pays(llama, flat_plan) and not flat_update_pays(gemma, flat_plan)
    assert not flat_update_pays(llama, flat_plan.replace(optimizer="adamw"))
    monkeypatch.setenv(switches.ENABLE_ENV, "flat_optimizer")
    assert flat_update_pays(llama) and not flat_update_pays(gemma)
    assert type(llama).__module__ in ROPE_PATCHED_BY_DEFAULT and type(gemma).__module__ not in ROPE_PATCHED_BY_DEFAULT


def test_gemma4_rope_fused_on_captured_steps_only_and_the_speed_model_follows(tmp_path, monkeypatch):
    """Gemma 4's modeling module points at the Triton RoPE when the steps replay as CUDA graphs (switch
    ``rope_gemma4``, on), never eagerly; the speed model prices the fused RoPE's host ops (one a call) for a captured
    plan and transformers' unfused ones for an eager plan or with the switch off."""
    import importlib

    import torch

    from train_fixtures import build_model, gemma4_config
    from vramplan.catalog import resolve_model
    from vramplan.estimate import architecture
    from vramplan.plan import Plan
    from vramplan.throughput import step_host_ops
    from vramplan.train.model import load_base_model
    from vramplan.train.patching import GEMMA4_ROPE_MODULE, apply_kernel_patches

    modeling = importlib.import_module(GEMMA4_ROPE_MODULE)
    original = getattr(modeling.apply_rotary_pos_emb, "vramplan_original", modeling.apply_rotary_pos_emb)
    gemma = load_base_model(build_model(gemma4_config(), tmp_path / "g"), torch.float32)
    arch, plan = architecture(resolve_model("gemma-4-e2b-text")), Plan(model="gemma-4-e2b-text", seq_len=2048)
    monkeypatch.delenv(switches.DISABLE_ENV, raising=False)
    assert plan.captures_steps
    modeling.apply_rotary_pos_emb = original  # whatever an earlier test patched
    try:
        apply_kernel_patches(gemma, captured=False)
        assert modeling.apply_rotary_pos_emb is original
        fused_ops = sum(step_host_ops(arch, plan).values())
        assert sum(step_host_ops(arch, plan.replace(cuda_graphs=False)).values()) > fused_ops
        apply_kernel_patches(gemma, captured=True)
        assert modeling.apply_rotary_pos_emb.vramplan_original is original
        monkeypatch.setenv(switches.DISABLE_ENV, "rope_gemma4")
        assert sum(step_host_ops(arch, plan).values()) > fused_ops
    finally:
        modeling.apply_rotary_pos_emb = original


def test_forced_sets_switches_for_its_block_and_restores_the_environment(monkeypatch):
    """Benchmarks price a measured run under the switches it ran with, whatever today's defaults are."""
    import os

    import pytest

    from benchmarks.records import switches_ran

    monkeypatch.setenv(switches.ENABLE_ENV, "flat_optimizer")
    monkeypatch.delenv(switches.DISABLE_ENV, raising=False)
    with switches.forced(fused_optimizer=True, rope=False):
        assert switches.enabled("fused_optimizer") and not switches.enabled("rope")
        assert switches.enabled("flat_optimizer")  # the others as the environment says
    assert not switches.enabled("fused_optimizer") and switches.enabled("rope")
    assert os.environ[switches.ENABLE_ENV] == "flat_optimizer" and switches.DISABLE_ENV not in os.environ
    with pytest.raises(KeyError, match="unknown switch"):
        with switches.forced(warp_drive=True):
            pass
    # a measured line says what stepped it; before it did, only the opt-in switch turned the kernel on
    assert switches_ran({"fused_optimizer": True})["fused_optimizer"]
    assert switches_ran({"chunk_alignment": [64, 8]})["aligned_attention_chunks"]  # lines since session 16 say
    assert switches_ran({"enabled": "fused_optimizer"})["fused_optimizer"]
    assert switches_ran({"enabled": "flat_optimizer"}) == switches_ran({}) == {"fused_optimizer": False,
                                                                               "int8_vocab_major": False,
                                                                               "overlap_optimizer": False,
                                                                               "queued_optimizer": False,
                                                                               "rope_gemma4": False,
                                                                               "prefetch_paged": True,
                                                                               "wide_head_attention": False,
                                                                               "wide_head_fused_rows": False,
                                                                               "sliding_band_attention": False,
                                                                               "aligned_attention_chunks": False,
                                                                               "compact_captures": False,
                                                                               "expandable_segments": False}
    assert switches_ran({"compact_captures": True})["compact_captures"]  # captures as before, until session 21
    assert switches_ran({"alloc_conf": "expandable_segments:True"})["expandable_segments"]  # lines since session 9
    assert not switches_ran({"prefetch_paged": False})["prefetch_paged"]  # bitsandbytes' own behaviour until then
    assert switches_ran({"wide_head_attention": True})["wide_head_attention"]  # SDPA's kernels before session 13
    assert switches_ran({"enabled": "rope_gemma4"})["rope_gemma4"]
    assert switches_ran({"overlap_optimizer": True})["overlap_optimizer"]
    assert switches_ran({"queued_optimizer": True})["queued_optimizer"]
    assert switches_ran({"int8_vocab_major": True})["int8_vocab_major"]
