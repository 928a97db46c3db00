# Session 22's eager campaign, printed before it ran: model, grid entry, the planner's peak GB above the CUDA context
# and its eager slack (fragmentation) GB, as it ships since session 22 (an eager step's slack priced by the adapter
# gradients torch's small pool serves), with the small-pool gradient MB beside them. Six plans no eager line has
# measured: five models, ranks 16-128 (at rank 128 Qwen3-0.6B's gradients straddle the 1 MiB line). Run from the
# repository root:
#   PYTHONPATH=. python benchmarks/results/session22/predict_eager.py benchmarks/results/session22/campaign-eager.json
import json, sys
from benchmarks.records import plan_of
from vramplan.catalog import resolve_model
from vramplan.estimate import architecture, estimate_plan
from vramplan.memory.adapters import small_pool_gradient_bytes

for model, grid in json.load(open(sys.argv[1])):
    for g in grid:
        plan = plan_of(dict(**g, model=model))
        prof = resolve_model(model)
        est = estimate_plan(plan, prof)
        print(model, json.dumps(g), round((est.peak_bytes - est.components["cuda_context"]) / 1e9, 3), "fragmentation",
              round(est.components["fragmentation"] / 1e9, 3), "small-pool gradients MB",
              round(small_pool_gradient_bytes(architecture(prof), plan) / 1e6))
