"""Refitting the learned router (`tasks.learned`) from tenants' feedback, and deciding whether the
refitted router is better than the one in use.

A feedback row (`connectors.feedback.training_rows`) says: model M, on a prompt with embedding E,
was judged S (0 to 1). That is a training example of M's correctness head with the soft label S.

- `split`: train and held-out rows, by request: every fragment of a request on the same side,
  the side fixed by a hash of the request id, so a request never trains a router and scores it,
  in this run or any later one (the same request always falls on the same side).
- `refit`: each model with feedback gets its head fitted again on the recorded answers (the
  shipped recordings) and the feedback, the feedback weighted so that it is at least
  FEEDBACK_SHARE of the fit; every other part of the router is kept.
- `held_out_score`: log-loss, Brier score and accuracy of a router's P(correct) on rows it never
  trained on; `decide_publish`: publish only a router that is better there, on enough rows.
- `publish`: the router file written under a temporary name and renamed into place, so a reader
  sees the old router or the new one, never part of one.
- `comparison_markdown`: the two routers side by side, and the decision.

Rows of one tenant only: `refit` refuses rows of several, so one tenant's judgements never shape
another's routing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from homeskillet.errors import InvalidRequest
from tasks.learned import L2, Head, Router, fit_logistic
from tasks.learning import Examples

HELD_OUT_SHARE = 0.3
# The recordings are thousands of answers to benchmark questions, a tenant's feedback a few dozen
# judgements of its own prompts: counted one for one, feedback would move a head by a percent or
# two and never change how the tenant is routed. Each feedback row is counted W times, W the least
# whole number that makes the feedback at least this share of the fit; the recordings keep the
# rest, which holds the head where the tenant gave no feedback. Whether that helps is not assumed:
# the refitted router is published only when it is better on held-out feedback.
FEEDBACK_SHARE = 0.5
MARGIN = 0.002  # a refitted router must lower the held-out log-loss (nats per row) by at least this
EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] in the log-loss


def _side(request_id: str, seed: int | str) -> float:
    """A number in [0, 1) fixed by the request id and the seed."""
    digest = hashlib.sha256(f"{seed}\x00{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(rows: pd.DataFrame, share: float = HELD_OUT_SHARE, seed: int | str = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows to train on and the rows held out (about `share` of the requests), by request id:
    all of a request's fragments fall on the same side, and the same request on the same side
    whenever it is split again (with the same seed)."""
    if not 0 < share < 1:
        raise InvalidRequest(f"the held-out share must be between 0 and 1, not {share!r}")
    held = rows["request_id"].map(lambda r: _side(str(r), seed) < share).astype(bool)
    return rows[~held].reset_index(drop=True), rows[held].reset_index(drop=True)


def tenant_of(rows: pd.DataFrame) -> str | None:
    """The one tenant whose rows these are (None when there are none); InvalidRequest when they
    are several tenants'."""
    tenants = sorted(set(rows["tenant"])) if len(rows) else []
    if len(tenants) > 1:
        raise InvalidRequest(f"feedback of {len(tenants)} tenants given to one refit; refit each tenant on its own")
    return tenants[0] if tenants else None


def _matrix(embeddings: pd.Series) -> np.ndarray:
    x = np.stack([np.asarray(e, np.float64) for e in embeddings]) if len(embeddings) else np.zeros((0, 384))
    if x.ndim != 2 or x.shape[1] != 384:
        raise InvalidRequest(f"feedback embeddings must have 384 dimensions, not {x.shape[1:]}")
    return x


def _recorded(recorded: Examples | None, model: str) -> tuple[np.ndarray, np.ndarray]:
    """The recorded examples of one model: embeddings and 1/0 labels (none when it is not there)."""
    if recorded is None or model not in recorded.models:
        return np.zeros((0, 384)), np.zeros(0)
    j = recorded.models.index(model)
    answered = ~np.isnan(recorded.correct[:, j])
    return recorded.x[answered].astype(np.float64), recorded.correct[answered, j]


def feedback_weight(recorded: int, feedback: int, share: float = FEEDBACK_SHARE) -> int:
    """How many recorded examples one feedback row counts as: the least whole W ≥ 1 with
    W·feedback ≥ share of W·feedback + recorded."""
    if feedback <= 0:
        raise InvalidRequest("no feedback to weigh")
    return max(1, math.ceil(share / (1 - share) * recorded / feedback - 1e-9))


def refit(
    base: Router,
    recorded: Examples | None,
    feedback_rows: pd.DataFrame,
    l2: float | None = None,
    share: float = FEEDBACK_SHARE,
) -> Router:
    """The base router with each model that has feedback rows refitted on its recorded examples
    (when given) and those rows, each row counted `feedback_weight` times (repeated: exactly a
    weight in the log-likelihood). Models without feedback keep their heads; a model the base
    does not know is left out (the router has no cost for it). Cost models, the default λ,
    auto's λs and everything else are the base's. `trained_on` adds what the refit saw: the
    tenant, the rows per model, their weights and when. l2: the base's penalty by default."""
    tenant = tenant_of(feedback_rows)
    l2 = float(base.trained_on.get("l2", L2) if l2 is None else l2)
    heads = dict(base.heads)
    per_model: dict[str, int] = {}
    weights: dict[str, int] = {}
    for model, mine in feedback_rows.groupby("model", sort=True):
        model = str(model)
        if model not in base.heads:
            continue
        x_rec, y_rec = _recorded(recorded, model)
        x_fb = _matrix(mine["embedding"])
        y_fb = mine["score"].to_numpy(np.float64)
        w = feedback_weight(len(y_rec), len(y_fb), share)
        x = np.vstack([x_rec, np.repeat(x_fb, w, axis=0)])
        y = np.concatenate([y_rec, np.repeat(y_fb, w)])
        labels = np.concatenate([y_rec, y_fb])
        heads[model] = Head(fit_logistic(x, y, l2), base.heads[model].cost, len(labels), float(labels.mean()))
        per_model[model] = len(y_fb)
        weights[model] = w
    skipped = sorted(set(feedback_rows["model"]) - set(base.heads)) if len(feedback_rows) else []
    trained_on = dict(base.trained_on) | {
        "feedback": {
            "tenant": tenant,
            "rows": int(sum(per_model.values())),
            "per_model": per_model,
            "weight": weights,
            "unknown_models": skipped,
            "recorded": recorded is not None,
            "l2": l2,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    }
    return replace(base, heads=heads, trained_on=trained_on)


def held_out_score(router: Router, rows: pd.DataFrame) -> dict:
    """How well the router's P(correct) fits held-out feedback, on the rows whose model it knows:
    log-loss against the score (a soft label), Brier score, and the share of rows where
    P(correct) ≥ 0.5 agrees with score ≥ 0.5. The figures are None when no row is left."""
    known = rows[rows["model"].isin(list(router.heads))] if len(rows) else rows
    if len(known) == 0:
        return {"rows": 0, "log_loss": None, "brier": None, "accuracy": None}
    p = np.empty(len(known))
    for model, idx in known.groupby("model").indices.items():
        p[idx] = router.heads[str(model)].p_correct(_matrix(known["embedding"].iloc[idx]))
    s = known["score"].to_numpy(np.float64)
    q = np.clip(p, EPS, 1 - EPS)
    return {
        "rows": int(len(known)),
        "log_loss": float(-np.mean(s * np.log(q) + (1 - s) * np.log(1 - q))),
        "brier": float(np.mean((p - s) ** 2)),
        "accuracy": float(np.mean((p >= 0.5) == (s >= 0.5))),
    }


def decide_publish(current_score: dict, new_score: dict, min_rows: int, margin: float = MARGIN) -> tuple[bool, str]:
    """Publish the refitted router only when its held-out log-loss is lower than the current
    router's by at least `margin`, on at least min_rows held-out rows: (publish, why)."""
    rows, min_rows = new_score["rows"], max(min_rows, 1)
    if rows < min_rows or current_score["rows"] < min_rows:
        return False, f"{rows} held-out rows, fewer than {min_rows}: too few to tell the routers apart"
    if current_score["rows"] != rows:
        return False, "the routers were scored on different rows; not comparable"
    current, new = current_score["log_loss"], new_score["log_loss"]
    if new < current - margin:
        return True, f"held-out log-loss {new:.4f} < {current:.4f} (by more than {margin:g}) on {rows} rows"
    return False, f"held-out log-loss {new:.4f}, not lower than {current:.4f} by {margin:g} on {rows} rows"


def publish(router: Router, path: Path) -> Path:
    """Write the router to `path` (`Router.save` writes a temporary file and renames it over)."""
    router.save(path)
    return Path(path)


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def comparison_markdown(tenant: str, current: Router, new: Router, scores: dict, decision: tuple[bool, str]) -> str:
    """The current and refitted routers of a tenant side by side: held-out log-loss, Brier score
    and accuracy (scores: {"current": held_out_score, "new": held_out_score, "train": rows}), the
    feedback each model's head was refitted with, and whether the refitted one was published."""
    published, why = decision
    refit_info = new.trained_on.get("feedback", {})
    cur, nxt = scores["current"], scores["new"]
    lines = [
        f"# learn-routing: {tenant}",
        "",
        f"Feedback rows: {scores.get('train', refit_info.get('rows', 0))} trained on, {nxt['rows']} held out "
        f"(whole requests on one side). Recorded answers: {'yes' if refit_info.get('recorded') else 'no'}.",
        "",
        "| held-out metric | current | refitted | better |",
        "| --- | --- | --- | --- |",
    ]
    for name, key, lower in (
        ("log-loss", "log_loss", True),
        ("Brier score", "brier", True),
        ("accuracy", "accuracy", False),
    ):
        a, b = cur[key], nxt[key]
        better = (
            ""
            if a is None or b is None
            else ("refitted" if (b < a if lower else b > a) else "current" if a != b else "same")
        )
        lines.append(f"| {name} | {_figure(a)} | {_figure(b)} | {better} |")
    lines.append(f"| rows | {cur['rows']} | {nxt['rows']} | |")
    lines += [
        "",
        "| model | feedback rows | weight | examples (current) | examples (refitted) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, count in sorted(refit_info.get("per_model", {}).items()):
        before = current.heads[model].examples if model in current.heads else 0
        lines.append(f"| {model} | {count} | {refit_info['weight'][model]} | {before} | {new.heads[model].examples} |")
    if refit_info.get("unknown_models"):
        lines += ["", f"Not refitted (no head to refit): {', '.join(refit_info['unknown_models'])}."]
    lines += ["", f"**{'Published' if published else 'Not published'}**: {why}."]
    return "\n".join(lines) + "\n"
