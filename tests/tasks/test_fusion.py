"""Fusion (`tasks.fusion`): fragment answers become one answer, in prompt order or the reduce step's,
with per-fragment provenance and the costs added."""

import pytest

from homeskillet.schemas import Plan
from tasks.fusion import fuse_results
from tests.support import frag, fragment_result


def test_ordered_fusion_keeps_the_prompt_order_and_adds_costs():
    plan = Plan(request_id="r", fusion="ordered", fragments=[frag("f1", "Q one?"), frag("f2", "Q two?")])
    fused = fuse_results(plan, {"f2": fragment_result("f2", " B "), "f1": fragment_result("f1", "A")}, "acme", 1.5)
    assert fused.answer == "1. Q one?\nA\n\n2. Q two?\nB"
    assert [r.fragment_id for r in fused.fragments] == ["f1", "f2"]
    assert fused.cost_usd == pytest.approx(1.0)


def test_reduce_fusion_answers_with_the_final_fragment():
    plan = Plan(
        request_id="r",
        fusion="reduce",
        fragments=[frag("f1", "a"), frag("f2", "b"), frag("f3", "{f1} {f2}", deps=["f1", "f2"])],
    )
    fused = fuse_results(plan, {f: fragment_result(f, f"text {f}") for f in ("f1", "f2", "f3")}, "acme", 1.0)
    assert fused.answer == "text f3"
    assert len(fused.fragments) == 3


def test_fusion_refuses_missing_results():
    plan = Plan(request_id="r", fusion="ordered", fragments=[frag("f1", "a"), frag("f2", "b")])
    with pytest.raises(ValueError, match="f2"):
        fuse_results(plan, {"f1": fragment_result("f1", "x")}, "acme", 1.0)
