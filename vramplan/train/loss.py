"""The training loss: the decoder's hidden states through the fused LM head + cross-entropy.

The model's own ``forward(labels=...)`` path is never used in training: it materialises
b·s·V logits, upcasts them to fp32 and keeps their gradient (2.1 GB per copy at s=4096,
V=128k). ``ops.linear_cross_entropy`` computes the same loss in chunks of tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from vramplan.stacks.vramplan import int8_vocab_major
from vramplan.train import attention, ops, patching


def lm_head_of(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise AssertionError(f"{type(model).__name__} has no output embeddings")
    return head


def head_weight(head: nn.Module):
    """What the fused loss multiplies by: the bf16 weight, or the int8 rows of a quantized head."""
    return head.rows if isinstance(head, patching.Int8LMHead) else head.weight


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final-norm hidden states of the decoder, with no cache (training)."""
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids", "labels")}
    if media:  # pixel values / audio features: the multimodal model runs the towers and fills in their soft tokens
        dtype = model.get_input_embeddings().weight.dtype
        media = {k: v.to(dtype) if v.is_floating_point() else v for k, v in media.items()}
        out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **media)
        return out.last_hidden_state
    out = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return out.last_hidden_state


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the token losses of one micro-batch and its number of target tokens."""
    return summed_loss_of_hidden(model, hidden_states(model, batch), batch["labels"])


def summed_loss_of_hidden(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused LM head + cross-entropy over the decoder's hidden states (summed, with the target count):
    the model's head (bf16 or int8 rows), its final-logit softcap and the plan's chunk budget."""
    head = lm_head_of(model)
    weight = head_weight(head)
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    # the plan's budget (load_for_training sets it); the kernel's default where a model was loaded otherwise
    chunk = ops.default_chunk_size(hidden.numel() // hidden.shape[-1], weight.shape[0], weight.dtype,
                                   getattr(model, "loss_chunk_bytes", None))
    return ops.linear_cross_entropy(hidden, weight, labels, bias=head.bias, softcap=softcap,
                                    reduction="sum", chunk_size=chunk, vocab_major=int8_vocab_major())


def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                         parallel=None, graphs=None, wait: bool = True, loss_scale: float = 1.0
                         ) -> tuple[float | torch.Tensor, int | torch.Tensor]:
    """Forward + backward over the micro-batches of one optimizer step; return (mean token loss, target tokens).
    ``wait=False`` returns them as tensors still on the device, so the caller can queue the optimizer's
    step behind the backward before its one wait on the GPU (reading them is that wait).

    Every micro-batch's summed loss is divided by the target-token count of the WHOLE
    accumulated batch, so the gradient equals that of one big batch; averaging per micro-batch
    would weight the tokens of short micro-batches more. With ``graphs`` (a ``graphs.StepGraphs``)
    a micro-batch it has captured replays as one CUDA graph (the others run eagerly, on its stream). On several ranks (``parallel``, a
    ``distributed.Parallel``) the count is summed over the ranks first, on the device, and the
    loss scaled by the world size, which DDP's and FSDP's gradient averaging divides back out:
    the gradient is the one of the global batch as one rank would compute it. ``loss_scale``
    multiplies what the backward sees (fp16 steps, ``loss_scale.LossScale``), not the returned loss.
    """
    if not micro_batches:
        return 0.0, 0
    # counted and summed on the device: one host sync per optimizer step (the returned numbers),
    # not two per micro-batch, so the host keeps queueing kernels while the GPU works
    total_targets = torch.stack([(mb["labels"] != -100).sum() for mb in micro_batches]).sum()
    world = 1
    if parallel is not None:
        total_targets = parallel.all_reduce_sum(total_targets)
        world = parallel.size
    denominator = total_targets.clamp(min=1) / world
    if loss_scale != 1.0:
        denominator = denominator / loss_scale
    loss_sum = torch.zeros((), device=total_targets.device)
    with attention.sliding_masks_left_out():  # eager forwards (a graph's too); captures decide in packing_decided
        for index, mb in enumerate(micro_batches):
            if graphs is not None and parallel is None:
                loss = graphs.summed_loss(mb, denominator)
            elif parallel is None:
                loss, _ = summed_loss(model, mb)
                (loss / denominator).backward()
            else:
                with parallel.gradient_sync(last=index == len(micro_batches) - 1):
                    loss, _ = parallel.module(mb["input_ids"], mb["position_ids"], mb["labels"])
                    (loss / denominator).backward()
            loss_sum += loss.detach()
    if parallel is not None:
        loss_sum = parallel.all_reduce_sum(loss_sum)
    mean_loss = loss_sum / total_targets.clamp(min=1)
    if not wait:
        return mean_loss, total_targets
    return float(mean_loss), int(total_targets)
