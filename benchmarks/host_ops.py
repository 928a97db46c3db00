"""Host work of one trainer step, counted on the CPU: aten ops per step and time in the autograd Functions.

On the GPU the trainer is bound by the host (Python and launch overhead, not the kernels), and
that overhead is mostly the same on the CPU. This builds a tiny random Llama with many layers,
runs the trainer's step (bf16 compute, LoRA on all linears, full checkpointing, a bf16 base so
the CPU's NF4 reference decode does not swamp the count) under torch.profiler, and prints

    aten ops/step, QLoRALinearFunction fwd/bwd calls and ops per call, and the top ops.

A proxy that needs no GPU: compare it before and after a host-side change.

    python -m benchmarks.host_ops --layers 16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vramplan.plan import Plan
from vramplan.train.loss import accumulate_gradients
from vramplan.train.model import enable_checkpointing, load_base_model, lora_parameters, prepare_for_qlora


def tiny_llama(folder: Path, layers: int, hidden: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type="llama", hidden_size=hidden, intermediate_size=4 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    folder = tiny_llama(Path(tempfile.mkdtemp()), args.layers, args.hidden)
    plan = Plan(model="tiny", quant="bf16", lora_rank=16, seq_len=args.seq)
    model = load_base_model(folder, torch.bfloat16)
    prepare_for_qlora(model, plan, torch.device("cpu"))
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 512, (1, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(args.seq)[None]}

    def step():
        accumulate_gradients(model, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    aten = sum(e.count for e in events if e.key.startswith("aten::")) // args.steps
    print(f"{aten} aten ops/step ({args.layers} layers, {len(params) // 2} LoRA linears)")
    for name in ("QLoRALinearFunction", "QLoRALinearFunctionBackward"):
        e = by_name.get(name)
        if e:
            print(f"{name}: {e.count // args.steps} calls/step, self CPU {e.self_cpu_time_total / e.count:.1f} us/call, "
                  f"total {e.cpu_time_total / e.count:.1f} us/call")
    print(events.table(sort_by="count", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
