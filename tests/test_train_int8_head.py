"""head_quant="int8" in the trainer: one int8 table serves a tied embedding and the LM head, the lookup
keeps Gemma's sqrt(hidden) scale, the loss starts where the bf16 head's does and falls, and the PEFT
adapter never holds the head (it loads on the untouched bf16 base)."""

import json

import pytest
import torch

from train_fixtures import build_model, gemma4_config, llama_config, models_with_data
from vramplan.errors import VramplanError
from vramplan.plan import Plan
from vramplan.train import patching
from vramplan.train.loss import summed_loss
from vramplan.train.model import load_base_model, load_for_training
from vramplan.train.recipe import TrainConfig, train

IDS = torch.tensor([[2, 12, 30, 25, 9, 40, 33, 12, 30, 18, 21, 14]])
CONFIGS = {"llama": lambda: dict(llama_config(), tie_word_embeddings=True), "gemma4": gemma4_config}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = models_with_data(tmp_path_factory.mktemp("int8head"), CONFIGS)
    build_model(llama_config(), root / "untied")
    return root


def plan(name, head_quant="int8", **changes):
    return Plan(model=name, quant="bf16", lora_rank=8, seq_len=64, head_quant=head_quant, **changes)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_int8_table_serves_the_tied_lookup_and_the_head(work, name):
    model, _ = load_for_training(work / name, plan(name), torch.device("cpu"))
    reference = load_base_model(work / name, torch.float32).eval()
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(table, patching.Int8TokenTable) and head.table is table
    assert table.qweight.dtype == torch.int8 and table.qweight.shape == (300, 64)
    assert len([b for n, b in model.named_buffers() if b.dtype == torch.int8]) == 1
    assert not any(n.endswith("embed_tokens.weight") or "lm_head" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        ours, theirs = table(IDS), reference.get_input_embeddings()(IDS)
    # the lookup is the dequantized rows times the model's own embedding scale (sqrt(64) = 8 on Gemma)
    step = (table.qscale[IDS] * table.embed_scale).unsqueeze(-1)
    assert ((ours - theirs).abs() <= step / 2 + 1e-6).all()
    assert table.embed_scale == (8.0 if name == "gemma4" else 1.0)
    assert model.loss_chunk_bytes == 128 * 2**20  # the plan's loss_chunk_mb, handed to the fused loss
    model.eval()
    with torch.no_grad():  # called as a module (evaluation, generate) the head dequantizes whole: same logits, nearly
        ours, theirs = model(input_ids=IDS).logits, reference(input_ids=IDS).logits
    assert (ours - theirs).norm() < 0.05 * theirs.norm()  # measured 2.1% on Gemma (sqrt(h)-scaled lookups), less on Llama


def test_untied_head_is_int8_and_the_input_embedding_is_untouched(work):
    model, _ = load_for_training(work / "untied", plan("untied"), torch.device("cpu"))
    assert isinstance(model.get_output_embeddings(), patching.Int8LMHead)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding  # on a GPU: host-resident, as before


@pytest.mark.parametrize("name", CONFIGS)
def test_step0_loss_close_to_the_bf16_head(work, name):
    """The same batch through the same LoRA-initialised model, head bf16 vs int8 (fp32 compute on the CPU)."""
    batch = {"input_ids": IDS, "position_ids": torch.arange(IDS.shape[1]).unsqueeze(0),
             "labels": torch.cat([IDS[:, 1:], torch.tensor([[-100]])], dim=1)}
    losses = {}
    for head_quant in ("bf16", "int8"):
        model, _ = load_for_training(work / name, plan(name, head_quant), torch.device("cpu"), seed=0)
        with torch.no_grad():
            total, count = summed_loss(model, batch)
        losses[head_quant] = (total / count).item()
    diff = abs(losses["int8"] - losses["bf16"])
    print(f"{name}: step-0 loss bf16 head {losses['bf16']:.5f}, int8 head {losses['int8']:.5f}, |diff| {diff:.2e}")
    assert diff < 5e-3 * losses["bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_loss_falls_and_the_adapter_loads_on_the_bf16_base(work, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = work / f"{name}-run"
    if name == "llama":  # through the CLI: --head-quant overrides a plan file that has none
        from click.testing import CliRunner

        from vramplan.cli import main

        (work / "plan.json").write_text(json.dumps({"plan": plan(name, "bf16", micro_batch=2).to_dict()}))
        result = CliRunner().invoke(main, ["train", str(work / "plan.json"), "--model", str(work / name), "--data",
                                           str(work / "train.jsonl"), "--output", str(run), "--steps", "16",
                                           "--lr", "1e-2", "--warmup", "2", "--head-quant", "int8"])
        assert result.exit_code == 0, result.output
        assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["plan"]["head_quant"] == "int8"
    else:
        train(TrainConfig(plan=plan(name, micro_batch=2), model_dir=str(work / name), data=str(work / "train.jsonl"),
                          output=str(run), lr=1e-2, warmup_steps=2, progress=False, steps=16))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    print(f"{name}: int8 head, mean loss of steps 1-3 {first:.3f} -> steps 14-16 {last:.3f}")
    assert last < 0.8 * first, (first, last)
    from safetensors.torch import load_file

    keys = load_file(run / "adapter" / "adapter_model.safetensors")
    assert keys and all(".lora_" in k for k in keys)  # never the head, never the embedding
    base = AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32)
    head_before = base.get_output_embeddings().weight.clone()
    peft = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        assert torch.isfinite(peft(input_ids=IDS).logits).all()
    assert torch.equal(peft.get_output_embeddings().weight, head_before)


def test_multimodal_and_fsdp_plans_refuse_an_int8_head():
    with pytest.raises(VramplanError, match="head_quant"):
        Plan(model="m", head_quant="int8", modalities=("text", "image"), images_per_example=1)
    with pytest.raises(VramplanError, match="head_quant"):
        Plan(model="m", head_quant="int8", gpus=2, parallel="fsdp")
