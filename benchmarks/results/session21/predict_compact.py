# Session 21's held-out campaign of compact captures, printed before it ran: model, grid entry, tok/s (the shipped speed
# model, H100) and the planner's peak GB, both as they ship (compact captures on: no captured slack per adapter
# parameter). Run from the repository root:
#   PYTHONPATH=. python benchmarks/results/session21/predict_compact.py benchmarks/results/session21/campaign-compact.json
import json, sys
from benchmarks.records import plan_of
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.estimate import architecture, estimate_plan
from vramplan.throughput import predict_tokens_per_s

gpu = resolve_gpu("h100")
for model, grid in json.load(open(sys.argv[1])):
    for g in grid:
        plan = plan_of(dict({"cuda_graphs": True}, **g, model=model))
        prof = resolve_model(model)
        est = estimate_plan(plan, prof)
        print(model, json.dumps(g), round(predict_tokens_per_s(architecture(prof), plan, gpu)), round(est.peak_bytes / 1e9, 2),
              "fragmentation", round(est.components["fragmentation"] / 1e9, 3))
