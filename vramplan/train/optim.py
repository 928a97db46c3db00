"""bitsandbytes' 8-bit AdamW with one device sync per step instead of one per parameter.

bitsandbytes 0.50's ``Optimizer8bit.step`` calls ``torch.cuda.synchronize()`` after the update
of every parameter (a guard for parameters spread over several GPUs). A LoRA run updates
hundreds of small adapter tensors (224 for Llama-3.2-1B on all linears), so the host waits for
the GPU 224 times a step, for kernels of a few microseconds each. The trainer runs on one GPU,
where the updates are ordered on one stream: the same loop with a single sync at the end (which
bitsandbytes also does, for paged states) computes the same values.
"""

from __future__ import annotations

import functools

import torch


class _OneSyncPerStep:
    """Mixed in before a bitsandbytes ``Optimizer8bit`` subclass: its ``step`` loop minus the per-parameter sync."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                last = p
        if last is not None and last.device.type == "cuda":
            torch.cuda.synchronize(last.device)  # paged states are written asynchronously
        return loss


@functools.lru_cache(maxsize=None)
def eight_bit_adamw(paged: bool) -> type:
    """The bitsandbytes class for the plan's optimizer, with one sync per step (one class per kind,
    made on first use: importing bitsandbytes is slow and loud)."""
    import bitsandbytes as bnb

    base = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return type(base.__name__, (_OneSyncPerStep, base), {"__doc__": base.__doc__, "__module__": __name__})
