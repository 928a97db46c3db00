"""The GPU benchmark cases of rmsnorm, rope and glu build and run (at a few tokens, on the CPU under
Triton's interpreter), and every variant of a case computes the same gradients."""

import pytest
import torch

from benchmarks.fwd_bwd import forward_backward
from benchmarks.kernel_cases import glu, rmsnorm, rope
from vramplan_kernels.glu import geglu_reference

TOKENS = 4


@pytest.mark.parametrize("module", [rmsnorm, rope, glu], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_cases_run_and_variants_agree(module):
    torch.manual_seed(0)
    # Dynamo with the eager backend checks the torch.compile variants' wiring without inductor's C++ builds.
    cases = module.cases("cpu", tokens=TOKENS, compile_backend="eager")
    assert cases and all(c.bytes_moved > 0 for c in cases)
    for case in cases:
        assert list(case.variants)[:3] == ["vramplan", "torch", "torch.compile"]
        grads = {name: fn() for name, fn in case.variants.items()}
        want = grads["torch"]
        for name, got in grads.items():
            if module is glu and name == "vramplan":
                continue  # its in-place backward has overwritten its own inputs; checked below
            for g, w in zip(got, want):
                torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2, msg=f"{case.shape} {name}")


def test_glu_case_in_place_variant_matches_on_its_first_run():
    torch.manual_seed(0)
    # The case's in-place variant and its reference start from different random buffers, so run
    # the variant's own step function against the reference on shared inputs instead.
    g, u = glu._buffers(TOKENS, 40, "cpu")
    dout = torch.randn(TOKENS, 40, dtype=torch.bfloat16)
    want = forward_backward(lambda: geglu_reference(g, u), [g, u], [dout])()
    want = [w.clone() for w in want]
    got = forward_backward(lambda: glu._ours("geglu", g, u), [g, u], [dout])()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    assert got[0].data_ptr() == g.data_ptr()  # dgate really went into gate's buffer
