"""Whether a plan's steps are captured is the model's question too: the trainer never captures an MoE
model's steps (routing reads the router's choice on the host), so the planner, the throughput model,
fit, estimate and buy price and label such a plan as eager, while dense plans keep their graphs."""

import json

import pytest
from click.testing import CliRunner

from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.cli import main
from vramplan.estimate import architecture, estimate_plan
from vramplan.fit import _candidates, fit_plan
from vramplan.memory.overhead import CUDA_GRAPH_BYTES
from vramplan.plan import Plan
from vramplan.stacks.vramplan import graphs_apply
from vramplan.throughput import captured_phases, predict_tokens_per_s

MOE = ("qwen3-30b-a3b", "gemma-4-26b-a4b")
DENSE = ("llama-3.2-1b", "gemma-4-e2b-text")


def _arch(model: str):
    return architecture(resolve_model(model))


def test_the_planner_knows_which_models_route_experts():
    """The profiles' configs, and the tiny ones the trainer's tests build (test_train_graphs checks the trainer agrees)."""
    from test_train_moe import gemma4_moe_config, qwen3_moe_config
    from train_fixtures import gemma4_config, llama_config
    from vramplan.arch import from_config

    assert all(_arch(m).routes_experts for m in MOE) and not any(_arch(m).routes_experts for m in DENSE)
    assert from_config(qwen3_moe_config()).routes_experts and from_config(gemma4_moe_config()).routes_experts
    assert not from_config(llama_config()).routes_experts and not from_config(gemma4_config()).routes_experts


@pytest.mark.parametrize("model", MOE + DENSE)
def test_graphs_memory_only_where_the_trainer_captures(model):
    plan = Plan(model=model, quant="nf4")
    assert plan.captures_steps  # the plan alone asks for graphs either way
    profile = resolve_model(model)
    graphs, eager = estimate_plan(plan, profile), estimate_plan(plan.replace(cuda_graphs=False), profile)
    if model in MOE:
        assert not graphs_apply(_arch(model), plan)
        assert "cuda_graphs" not in graphs.components and graphs.peak_bytes == eager.peak_bytes
    else:
        assert graphs_apply(_arch(model), plan)
        assert graphs.components["cuda_graphs"] == CUDA_GRAPH_BYTES
        # and the allocator's slack under capture for the eager one's, and the checkpoints an eager backward lets go
        # as its gradients come (a captured step makes them one buffer first)
        slack = graphs.components["fragmentation"] - eager.components["fragmentation"]
        kept = graphs.components["activations"] - eager.components["activations"]
        assert kept > 0
        assert graphs.peak_bytes == eager.peak_bytes + CUDA_GRAPH_BYTES + slack + kept


@pytest.mark.parametrize("model", MOE + DENSE)
def test_an_moe_plan_is_predicted_as_fast_as_its_eager_self(model):
    arch, plan, h100 = _arch(model), Plan(model=model, quant="nf4"), resolve_gpu("h100")
    graphs = predict_tokens_per_s(arch, plan, h100)
    eager = predict_tokens_per_s(arch, plan.replace(cuda_graphs=False), h100)
    if model in MOE:
        assert captured_phases(arch, plan) == ()
        assert graphs == eager
    else:
        assert captured_phases(arch, plan)
        assert graphs > 1.2 * eager  # host-bound small models: the replay takes the host out


def test_fit_tries_no_graphs_for_an_moe_model():
    moe = list(_candidates(Plan(model=MOE[0]), 2048, 1, _arch(MOE[0])))
    dense = list(_candidates(Plan(model=DENSE[0]), 2048, 1, _arch(DENSE[0])))
    assert moe and not any(graphs_apply(_arch(MOE[0]), p) for p in moe)
    assert len(set(moe)) == len(moe)
    assert any(graphs_apply(_arch(DENSE[0]), p) for p in dense)


@pytest.mark.parametrize("model,gpu", [(MOE[0], "rtx-4090"), (MOE[1], "h100"), (DENSE[0], "rtx-4060")])
def test_fit_and_estimate_label_graphs_only_where_they_run(model, gpu):
    result = fit_plan(resolve_model(model), resolve_gpu(gpu))
    shown = CliRunner().invoke(main, ["fit", model, "--gpu", gpu])
    estimated = CliRunner().invoke(main, ["estimate", model, "--gpu", gpu])
    as_json = CliRunner().invoke(main, ["estimate", model, "--gpu", gpu, "--json"])
    assert shown.exit_code == estimated.exit_code == as_json.exit_code == 0, shown.output + estimated.output
    summary, estimate_summary = shown.output.splitlines()[0], estimated.output.splitlines()[0]
    components = json.loads(as_json.output)["components"]
    if model in MOE:
        assert "CUDA graphs" not in summary and "CUDA graphs" not in estimate_summary
        assert "cuda_graphs" not in result.estimate.components and "cuda_graphs" not in components
        assert not any("CUDA graphs (without them" in line for line in result.explanation)
        assert any("no CUDA graphs (routing to the MoE experts" in line for line in result.explanation)
    else:
        assert summary.endswith(", CUDA graphs") and estimate_summary.endswith(", CUDA graphs")
        assert "cuda_graphs" in result.estimate.components and "cuda_graphs" in components
        assert any("CUDA graphs (without them" in line for line in result.explanation)


@pytest.mark.parametrize("model", (MOE[0], DENSE[0]))
def test_buy_prices_and_labels_an_moe_plan_eager(model):
    from vramplan.buy import Job, price_option
    from vramplan.cli.cmd_buy import _plan_text

    profile, h100 = resolve_model(model), resolve_gpu("h100")
    option = price_option(Job(profile, Plan(model=model), 10_000_000), h100)
    assert option.fits and option.plan.captures_steps
    eager = predict_tokens_per_s(_arch(model), option.plan.replace(cuda_graphs=False), h100)
    if model in MOE:
        assert option.tokens_per_s == eager and not _plan_text(option.plan).endswith(" graphs")
    else:
        assert option.tokens_per_s > eager and _plan_text(option.plan).endswith(" graphs")
