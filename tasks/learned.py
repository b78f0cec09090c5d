"""The learned router: for each model, P(its answer is right) from a sentence embedding of the
prompt (logistic regression), and its cost; a fragment goes to argmax P(correct) − λ·cost.

Costs are compared as shares of the dearest candidate's, so λ needs no unit: at λ = 0.1 a model
must be 0.1 likelier to be right than one costing nothing to be worth the dearest model's price.
λ comes from the request (`Constraints.quality_cost`), else the tenant's covenant, else the
router's default, chosen on held-out data when it was trained.

Pure numpy: fitting is Newton's method on an L2-penalised log-likelihood (a few hundred features,
a few thousand examples); a router is a JSON file of a few hundred kB.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from homeskillet.errors import InvalidRequest

ROUTER = Path(__file__).resolve().parents[1] / "homeskillet" / "data" / "router.json"
SCALE = math.sqrt(384)  # unit-length embeddings scaled so that each feature is of order 1
L2 = 1000.0  # the penalty chosen by cross-validation on the RouterBench training files (AIQ)
LAMBDAS = tuple([0.0] + [float(x) for x in np.geomspace(0.002, 5.0, 40)])  # the trade-offs a curve sweeps


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2) -> np.ndarray:
    """Weights (features then bias) of an L2-penalised logistic regression of y (labels or scores
    in [0, 1]) on x (rows of unit-length embeddings); the bias is not penalised."""
    if len(x) == 0:
        raise InvalidRequest("no examples to learn from")
    xb = np.hstack([x * SCALE, np.ones((len(x), 1))]).astype(np.float64)
    penalty = np.full(xb.shape[1], float(l2))
    penalty[-1] = 1e-6
    w = np.zeros(xb.shape[1])
    for _ in range(50):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (p - y) + penalty * w
        hessian = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty)
        step = np.linalg.solve(hessian, grad)
        w -= step
        if np.abs(step).max() < 1e-7:
            break
    return w


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _sigmoid((x * SCALE) @ w[:-1] + w[-1])


def fit_cost(length: np.ndarray, cost: np.ndarray) -> tuple[float, float]:
    """cost ≈ a + b·(prompt characters), least squares, neither part below 0."""
    if len(length) < 2 or np.ptp(length) == 0:
        return float(max(cost.mean(), 0.0)), 0.0
    b, a = np.polyfit(length.astype(np.float64), cost.astype(np.float64), 1)
    if b < 0:
        return float(max(cost.mean(), 0.0)), 0.0
    return float(max(a, 0.0)), float(b)


@dataclass(frozen=True)
class Head:
    """One model's correctness and cost models."""

    weights: np.ndarray
    cost: tuple[float, float]  # a, b: cost ≈ a + b·characters
    examples: int
    accuracy: float  # the share right in its training examples

    def p_correct(self, x: np.ndarray) -> np.ndarray:
        return predict(self.weights, x)

    def est_cost(self, length: np.ndarray) -> np.ndarray:
        return self.cost[0] + self.cost[1] * np.asarray(length, np.float64)


@dataclass(frozen=True)
class Router:
    heads: dict[str, Head]
    quality_cost: float  # the default λ
    # task type → the λ and the margin over single's model auto routes with (`choose`); None: single
    auto: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    trained_on: dict = field(default_factory=dict)
    # a cascade accepts its first model's answer when the model is this sure of it (token
    # log-probabilities), chosen on live answers of the local models; None: no such threshold
    accept_confidence: float | None = None

    def models(self) -> list[str]:
        return sorted(self.heads)

    def save(self, path: Path) -> None:
        data = {
            "quality_cost": self.quality_cost,
            "auto": {t: (None if v is None else {"quality_cost": v[0], "margin": v[1]}) for t, v in self.auto.items()},
            "accept_confidence": self.accept_confidence,
            "trained_on": self.trained_on,
            "heads": {
                m: {
                    "weights": [round(float(v), 5) for v in h.weights],
                    "cost": list(h.cost),
                    "examples": h.examples,
                    "accuracy": h.accuracy,
                }
                for m, h in sorted(self.heads.items())
            },
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        tmp.replace(path)  # a request routing now reads the old router or the new one, never part of one

    @classmethod
    def load(cls, path: Path) -> Router:
        """A router written by `save`; InvalidRequest naming the file for anything else."""
        try:
            data = json.loads(Path(path).read_text())
            heads = {
                m: Head(
                    np.asarray(h["weights"], np.float64), tuple(h["cost"]), int(h["examples"]), float(h["accuracy"])
                )
                for m, h in data["heads"].items()
            }
            if not heads or any(h.weights.shape != (385,) for h in heads.values()):
                raise ValueError("a head's weights are not 384 features and a bias")
            auto = {
                str(t): (None if v is None else (float(v["quality_cost"]), float(v["margin"])))
                for t, v in (data.get("auto") or {}).items()
            }
            accept = data.get("accept_confidence")
            return cls(
                heads,
                float(data["quality_cost"]),
                auto,
                dict(data.get("trained_on") or {}),
                None if accept is None else float(accept),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"{path}: not a router file ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Choice:
    """A learned routing decision and why: the model, P(correct) and estimated cost of the top
    candidates (by score), and the trade-off it was made at."""

    model: str
    quality_cost: float
    p_correct: dict[str, float]
    cost: dict[str, float]

    @property
    def why(self) -> str:
        top = ", ".join(f"{m} P={p:.2f} ${self.cost[m]:.6f}" for m, p in self.p_correct.items())
        return f"learned router at λ={self.quality_cost:g}: {top}"


def scores(p: dict[str, float], cost: dict[str, float], quality_cost: float) -> dict[str, float]:
    """P(correct) − λ·cost as a share of the dearest candidate's cost."""
    dearest = max(cost.values()) or 1.0
    return {m: p[m] - quality_cost * cost[m] / dearest for m in p}


def choose(
    p: dict[str, float],
    cost: dict[str, float],
    quality_cost: float,
    prefer: str | None = None,
    margin: float = 0.0,
    top: int = 3,
) -> Choice:
    """The candidate with the best score, the cheaper of two as good; `prefer` (a default model)
    scores `margin` more: another model must beat it by that much."""
    if not p:
        raise InvalidRequest("the learned router has no candidate model")
    score = scores(p, cost, quality_cost)
    if prefer in score:
        score[prefer] += margin
    ranked = sorted(p, key=lambda m: (-score[m], cost[m], m))
    shown = ranked[:top]
    return Choice(ranked[0], quality_cost, {m: p[m] for m in shown}, {m: cost[m] for m in shown})


def published(folder: Path, tenant: str | None = None) -> Path:
    """Where a router is published: a tenant's own under `tenants/` (so that no tenant's name,
    "default" included, can stand for the router every other tenant falls back to), else the
    default."""
    return Path(folder) / "tenants" / f"{tenant}.json" if tenant else Path(folder) / "default.json"


def router_path(folder: Path, tenant: str | None = None) -> Path | None:
    """The router a tenant's requests route with: its own published one, else the default
    published one, else the one the package ships; None when there is none at all."""
    for path in ([published(folder, tenant)] if tenant else []) + [published(folder), ROUTER]:
        if path.exists():
            return path
    return None
