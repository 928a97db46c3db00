# Session 21's eager campaign, held out against the speed model as it ships and against one rule committed with it
# before it ran (bacc025, as vramplan.throughput.for_host; moved here once the campaign had rejected it): the host term
# scaled by the line's own host probe, seconds per host op x host_dispatch_us / 7.1. Run from the repository root:
#   PYTHONPATH=. python benchmarks/results/session21/predict.py benchmarks/results/session21/campaign.json [RESULTS.jsonl]
# Without results: model, grid entry, tok/s priced as shipped (H100). With them: each measured line beside both.
import json, sys
from benchmarks.records import plan_of
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.estimate import architecture
from dataclasses import replace

from vramplan.throughput import factors_for, predict_tokens_per_s

#: The probe's reading on session 20's third host, whose eager Llama-3.2-1B run the shipped factors priced at -0.2%.
REFERENCE_HOST_DISPATCH_US = 7.1


def for_host(factors, host_dispatch_us):
    """The factors with the host's cost per op scaled by the line's probe (unchanged without one)."""
    if not host_dispatch_us:
        return factors
    return replace(factors, seconds_per_host_op=factors.seconds_per_host_op * host_dispatch_us / REFERENCE_HOST_DISPATCH_US)

gpu = resolve_gpu("h100")
factors = factors_for("vramplan")


def priced(model, grid, probe=None):
    plan = plan_of(dict({"cuda_graphs": True}, **grid, model=model))
    return predict_tokens_per_s(architecture(resolve_model(model)), plan, gpu, for_host(factors, probe))


if len(sys.argv) == 2:
    for model, grid in json.load(open(sys.argv[1])):
        for g in grid:
            print(model, json.dumps(g), round(priced(model, g)))
else:
    for line in open(sys.argv[2]):
        rec = json.loads(line) if line.startswith("{") else {}
        if "tok_s" not in rec:
            continue
        g = {k: rec[k] for k in ("seq", "rank", "gc", "batch", "cuda_graphs", "checkpointing") if k in rec}
        shipped, scaled = priced(rec["model"], g), priced(rec["model"], g, rec.get("host_dispatch_us"))
        print(rec["model"], json.dumps(g), f"probe {rec.get('host_dispatch_us')} us: measured {rec['tok_s']:.0f},"
              f" shipped {shipped:.0f} ({shipped / rec['tok_s'] - 1:+.1%}), probe-scaled {scaled:.0f} ({scaled / rec['tok_s'] - 1:+.1%})")
