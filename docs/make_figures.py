"""Regenerates docs/memory-breakdown.png: Gemma-4-E2B (text) at seq 2048, rank 16, on an RTX 4060,
with vramplan's trainer beside the standard transformers + PEFT + bitsandbytes recipe.

    python docs/make_figures.py
"""

from pathlib import Path

from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.estimate import estimate_plan
from vramplan.plan import Plan
from vramplan.plot import plot_estimates

if __name__ == "__main__":
    profile, gpu = resolve_model("gemma-4-e2b-text"), resolve_gpu("rtx-4060")
    estimates = [estimate_plan(Plan(model=profile.name, stack=stack, loss="chunked" if stack == "vramplan" else "full"),
                               profile, gpu) for stack in ("vramplan", "hf")]
    out = Path(__file__).resolve().parent / "memory-breakdown.png"
    plot_estimates(estimates, str(out), gpu, labels=["vramplan stack", "hf stack (transformers+PEFT+bnb)"])
    print(out)
