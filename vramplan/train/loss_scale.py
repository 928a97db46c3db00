"""Dynamic loss scaling for steps that compute in fp16 (GPUs without bf16: T4, V100, RTX 20xx).

Why: fp16 keeps 5 exponent bits. Its smallest normal number is 6e-5, and a mean token loss over
thousands of tokens hands the backward gradients far smaller than that. They flush to zero in the
frozen base's fp16 activations before they reach the adapters. So the loss is multiplied by a power
of two S before the backward (folded into the token-count divisor, so a captured CUDA graph replays
it with no new capture) and the adapters' gradients divided by S after. S doubles after
``growth_interval`` clean steps, as in ``torch.amp.GradScaler``.

Where GradScaler skips a step whose gradients overflowed, the trainer halves S and runs the same
micro-batches again (``recipe.train_step``): no batch is lost. It matters at the start, where S
falls from 2^16 to what the model's gradients allow: Gemma-4-E2B's (random weights, 2,048 tokens)
overflowed at every S from 2^16 to 2^10 on an H100 (benchmarks/results/session19), six or more
skipped steps, a tenth of a 60-step run. Until a step has updated, that search runs on the step's
first micro-batch alone, so a plan accumulating 16 micro-batches a step pays one pass an overflow,
not sixteen. bf16 has fp32's range and needs none of this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vramplan.errors import VramplanError

#: Below this the gradients overflow fp16 even scaled down 65,536 times: the run has diverged.
MIN_SCALE = 2.0 ** -16


@dataclass
class LossScale:
    """The scale S and how many clean steps it has lasted (saved in checkpoints, so a resumed run keeps it)."""

    scale: float = 2.0 ** 16
    growth_interval: int = 2000
    clean_steps: int = 0
    overflows: int = 0  # backward passes whose gradients overflowed, each run again at half the scale
    settled: bool = False  # a step has updated at this run's scale: until then it is sought on one micro-batch

    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divide the gradients by S in place (a power of two: exact unless they under- or overflow)."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool, step: int) -> None:
        """After a backward pass: grow S after enough clean steps; halve it after an overflow (the caller runs
        the pass again), or end the run once no scale keeps the gradients finite."""
        if finite:
            self.settled = True
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale, self.clean_steps = self.scale * 2.0, 0
            return
        self.overflows += 1
        self.scale, self.clean_steps = self.scale / 2.0, 0
        if self.scale < MIN_SCALE:
            raise VramplanError(f"the gradients overflow fp16 at every loss scale (step {step + 1}); lower --lr, or "
                                "train on a GPU with bf16 arithmetic (compute capability 8.0 or newer)")

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LossScale":
        state = dict(state)
        state["overflows"] = state.pop("skipped_steps", 0) + state.get("overflows", 0)  # session 18's checkpoints
        return cls(**state)


def for_dtype(dtype: torch.dtype) -> LossScale | None:
    """A loss scale for fp16 arithmetic; None for bf16 and fp32, which need none."""
    return LossScale() if dtype == torch.float16 else None
