"""The learned router (`tasks.learned`): logistic heads that learn who is right where, the choice
argmax P(correct) − λ·cost (the cheaper of two as good; a preferred model's margin), the file
round trip and its errors, and which router a tenant routes with."""

import numpy as np
import pytest

from homeskillet.errors import InvalidRequest
from tasks.learned import ROUTER, Head, Router, choose, fit_cost, fit_logistic, predict, published, router_path


def two_kinds(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of two kinds (near e0 or near e1) and a label: right on the first kind only."""
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 2
    x = rng.normal(0, 0.02, (n, 384))
    x[np.arange(n), kind] += 1.0
    return x / np.linalg.norm(x, axis=1, keepdims=True), (kind == 0).astype(float)


def test_a_head_learns_on_which_prompts_its_model_is_right():
    x, y = two_kinds()
    w = fit_logistic(x, y, l2=1.0)
    p = predict(w, x)
    assert p[y == 1].min() > 0.8 and p[y == 0].max() < 0.2
    flat = predict(fit_logistic(x, y, l2=1e6), x)  # a huge penalty leaves only the base rate
    assert flat == pytest.approx(np.full(len(x), 0.5), abs=0.02)
    with pytest.raises(InvalidRequest, match="no examples"):
        fit_logistic(x[:0], y[:0])


def test_the_choice_trades_probability_for_cost():
    p = {"big": 0.9, "small": 0.7}
    cost = {"big": 10.0, "small": 1.0}
    assert choose(p, cost, 0.0).model == "big"
    assert choose(p, cost, 0.5).model == "small"  # 0.9 - 0.5 < 0.7 - 0.05
    assert choose({"a": 0.5, "b": 0.5}, {"a": 2.0, "b": 1.0}, 0.0).model == "b"  # as good: the cheaper
    assert choose(p, cost, 0.0, prefer="small", margin=0.3).model == "small"
    why = choose(p, cost, 0.5).why
    assert "λ=0.5" in why and "small P=0.70" in why and "big P=0.90" in why


def test_cost_model_follows_prompt_length():
    a, b = fit_cost(np.array([100.0, 200.0, 300.0]), np.array([1.0, 2.0, 3.0]))
    assert (a, b) == pytest.approx((0.0, 0.01), abs=1e-9)
    assert fit_cost(np.array([5.0, 5.0]), np.array([1.0, 3.0])) == (2.0, 0.0)


def test_a_router_file_round_trips_and_a_bad_one_is_named(tmp_path):
    x, y = two_kinds()
    head = Head(fit_logistic(x, y, 1.0), (0.1, 0.001), len(x), float(y.mean()))
    router = Router({"m": head}, 0.2, {"code": (0.1, 0.05), "chat": None}, {"records": 40}, 0.9)
    router.save(tmp_path / "r.json")
    back = Router.load(tmp_path / "r.json")
    assert back.quality_cost == 0.2 and back.auto == {"code": (0.1, 0.05), "chat": None}
    assert back.accept_confidence == 0.9
    assert back.heads["m"].p_correct(x) == pytest.approx(head.p_correct(x), abs=1e-3)
    (tmp_path / "bad.json").write_text('{"heads": {"m": {"weights": [1, 2]}}}')
    with pytest.raises(InvalidRequest, match="bad.json: not a router file"):
        Router.load(tmp_path / "bad.json")


def test_a_tenants_own_router_comes_first_then_the_default_then_the_shipped_one(tmp_path):
    assert router_path(tmp_path, "acme") == (ROUTER if ROUTER.exists() else None)
    published(tmp_path).write_text("{}")
    assert router_path(tmp_path, "acme") == tmp_path / "default.json"
    published(tmp_path, "acme").parent.mkdir()
    published(tmp_path, "acme").write_text("{}")
    assert router_path(tmp_path, "acme") == tmp_path / "tenants" / "acme.json"
    published(tmp_path, "default").parent.mkdir(exist_ok=True)
    published(tmp_path, "default").write_text("{}")  # a tenant named "default" is still only itself
    assert router_path(tmp_path, "other") == tmp_path / "default.json"
    assert router_path(tmp_path, "other") == tmp_path / "default.json"


def test_the_shipped_router_is_small_and_knows_the_local_models():
    router = Router.load(ROUTER)
    assert ROUTER.stat().st_size < 600_000
    assert {"smollm2-135m", "gemma3-270m", "gpt-4-1106-preview"} <= set(router.heads)
