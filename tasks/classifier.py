"""The request classifier: a linear model over hashed character and word n-grams.

Inference is plain Python (no numpy, no network): featurise → dot products → softmax, so it can
be compiled for the edge later. The featurisation is deterministic: lower-case, FNV-1a 32-bit
hashes into `dim` buckets, sublinear counts, L2 norm. Training (numpy) is `train`, run by
`homeskillet train-classifier`, which writes the weights file `homeskillet/classifier.json`.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

LABELS = ("multiple_choice", "factual_qa", "math", "code", "summarize", "translate", "chat", "extract")
DIM = 4096
WEIGHTS = Path(__file__).resolve().parents[1] / "homeskillet" / "classifier.json"
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _fnv1a(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def features(text: str, dim: int = DIM) -> dict[int, float]:
    """Sparse feature vector: word unigrams and bigrams, character 3-5-grams (first 1,500 chars)."""
    text = " ".join(text.lower().split())[:1500]
    words = _TOKEN.findall(text)
    grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    padded = f" {text} "
    grams += [f"c:{padded[i:i + n]}" for n in (3, 4, 5) for i in range(len(padded) - n + 1)]
    counts: dict[int, float] = {}
    for gram in grams:
        index = _fnv1a(gram) % dim
        counts[index] = counts.get(index, 0.0) + 1.0
    vector = {i: 1.0 + math.log(c) for i, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
    return {i: v / norm for i, v in vector.items()}


@dataclass(frozen=True)
class Classifier:
    labels: tuple[str, ...]
    dim: int
    bias: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]  # one row per label

    def probabilities(self, text: str) -> dict[str, float]:
        x = features(text, self.dim)
        scores = [b + sum(row[i] * v for i, v in x.items()) for b, row in zip(self.bias, self.weights)]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        total = sum(exps)
        return {label: e / total for label, e in zip(self.labels, exps)}

    def predict(self, text: str) -> tuple[str, float]:
        probs = self.probabilities(text)
        label = max(probs, key=probs.get)
        return label, probs[label]

    def save(self, path: Path) -> None:
        rows = b"".join(struct.pack(f"<{self.dim}e", *row) for row in self.weights)
        path.write_text(
            json.dumps(
                {"labels": list(self.labels), "dim": self.dim, "bias": [round(b, 6) for b in self.bias],
                 "weights_f16_b64": base64.b64encode(rows).decode()},  # fmt: skip
                indent=1,
            )
        )

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> Classifier:
        data = json.loads(Path(path).read_text())
        dim, labels = int(data["dim"]), tuple(data["labels"])
        raw = base64.b64decode(data["weights_f16_b64"])
        values = struct.unpack(f"<{dim * len(labels)}e", raw)
        rows = tuple(tuple(values[k * dim : (k + 1) * dim]) for k in range(len(labels)))
        return cls(labels, dim, tuple(float(b) for b in data["bias"]), rows)


def train(texts: list[str], labels: list[str], *, epochs: int = 800, lr: float = 2.0, l2: float = 1e-5) -> Classifier:
    """Softmax regression by full-batch gradient descent, classes weighted by inverse frequency;
    deterministic for the same data."""
    import numpy as np

    names = tuple(sorted(set(labels), key=LABELS.index))
    y = np.array([names.index(label) for label in labels])
    x = np.zeros((len(texts), DIM))
    for row, text in enumerate(texts):
        for i, v in features(text).items():
            x[row, i] = v
    counts = np.bincount(y, minlength=len(names))
    sample_weight = (len(y) / (len(names) * counts))[y]
    w = np.zeros((len(names), DIM))
    b = np.zeros(len(names))
    onehot = np.eye(len(names))[y]
    for _ in range(epochs):
        scores = x @ w.T + b
        scores -= scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=1, keepdims=True)
        grad = (probs - onehot) * sample_weight[:, None] / sample_weight.sum()
        w -= lr * (grad.T @ x + l2 * w)
        b -= lr * grad.sum(axis=0)
    return Classifier(names, DIM, tuple(float(v) for v in b), tuple(tuple(float(v) for v in row) for row in w))


SEED = Path(__file__).resolve().parents[1] / "homeskillet" / "data" / "task_seed.yaml"
ROUTERBENCH_LABELS = {"arc_challenge_train.csv": "multiple_choice", "winograde_train.csv": "multiple_choice",
                      "mbpp_train.csv": "code"}  # fmt: skip


def last_question(prompt_cell: str) -> str:
    """RouterBench stores the prompt as a Python-list string; its last paragraph is the question."""
    import ast

    try:
        value = ast.literal_eval(prompt_cell)
    except (ValueError, SyntaxError):
        value = prompt_cell
    text = value[0] if isinstance(value, list) and value else str(value)
    return text.strip().split("\n\n")[-1]


def training_examples(routerbench: Path | None, per_file: int = 150) -> tuple[list[str], list[str]]:
    """The seed examples plus the first `per_file` prompts of each RouterBench file found."""
    import pandas as pd
    import yaml

    texts, labels = [], []
    for label, examples in yaml.safe_load(SEED.read_text()).items():
        texts += examples
        labels += [label] * len(examples)
    for name, label in ROUTERBENCH_LABELS.items():
        path = routerbench / name if routerbench else None
        if path is not None and path.exists():
            prompts = pd.read_csv(path, usecols=["prompt"])["prompt"].head(per_file)
            texts += [last_question(p) for p in prompts]
            labels += [label] * len(prompts)
    return texts, labels


def cross_validate(texts: list[str], labels: list[str], folds: int = 5) -> dict[str, float]:
    """Accuracy per label (and overall) of models trained without each fold, on that fold."""
    order = sorted(range(len(texts)), key=lambda i: _fnv1a(texts[i]))  # a fixed shuffle
    hits: dict[str, list[int]] = {}
    for k in range(folds):
        test = set(order[k::folds])
        model = train([t for i, t in enumerate(texts) if i not in test], [l for i, l in enumerate(labels) if i not in test])
        for i in test:
            hits.setdefault(labels[i], []).append(int(model.predict(texts[i])[0] == labels[i]))
    scores = {label: sum(h) / len(h) for label, h in hits.items()}
    scores["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return scores
