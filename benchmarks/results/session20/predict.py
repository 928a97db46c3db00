# The predictions the campaign is held out against, printed before it ran: model, grid entry, tok/s (the shipped
# speed model, H100), the planner's peak GB. Run from the repository root: PYTHONPATH=. python benchmarks/results/session20/predict.py benchmarks/results/session20/campaign.json
import json, sys
from benchmarks.records import plan_of
from vramplan.throughput import predict_tokens_per_s
from vramplan.estimate import architecture
from vramplan.catalog import resolve_model, resolve_gpu
from vramplan.estimate import estimate_plan
grids = json.load(open(sys.argv[1]))
gpu = resolve_gpu("h100")
for model, grid in grids:
    for g in grid:
        plan = plan_of(dict({"cuda_graphs": True}, **g, model=model))
        prof = resolve_model(model)
        tok = predict_tokens_per_s(architecture(prof), plan, gpu)
        est = estimate_plan(plan, prof)
        print(model, json.dumps(g), round(tok), round(est.peak_bytes/1e9, 2))
