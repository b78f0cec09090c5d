"""The request classifier: a linear model over hashed character and word n-grams.

One classifier, two implementations of the same rules: the WebAssembly kernel `edge/classifier.c`
(built into `edge/classifier.wasm`, used by the flow through wasmtime and at the edge) and this pure
Python reference (tests, training). The rules are byte-level and are defined in the kernel's header
comment; this module follows them step by step in float32 (each + - * / sqrt of the kernel is a
double operation here rounded to float32, which gives the same bits), so both give bit-identical
probabilities. Training (numpy) is `train`, run by `homeskillet train-classifier`, which writes the
weights file `homeskillet/classifier.json` and rebuilds the `.wasm` (tasks/edge_build.py).
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from dataclasses import dataclass
from decimal import Context, Decimal
from functools import lru_cache
from pathlib import Path

from homeskillet.errors import InvalidRequest

LABELS = ("multiple_choice", "factual_qa", "math", "code", "summarize", "translate", "chat", "extract")
DIM = 4096
WEIGHTS = Path(__file__).resolve().parents[1] / "homeskillet" / "classifier.json"
MAX_INPUT = 65_536  # bytes of UTF-8 looked at; the rest of a longer input is ignored
MAX_TEXT = 1_500  # bytes of normalised text the grams come from
LOG_TABLE_SIZE = 8_192  # > the most grams one text can give (about 7,500)
_TOKEN = re.compile(rb"[a-z0-9\x80-\xff]+|[^ a-z0-9\x80-\xff]")
_F32 = struct.Struct("<f")
_FNV_PRIME, _MASK = 0x01000193, 0xFFFFFFFF


def f32(value: float) -> float:
    """`value` rounded to the nearest float32 (as a Python float)."""
    return _F32.unpack(_F32.pack(value))[0]


def _fnv1a(text: str | bytes, h: int = 0x811C9DC5) -> int:
    for byte in text.encode("utf-8") if isinstance(text, str) else text:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return h


@lru_cache
def log_table() -> tuple[float, ...]:
    """float32(1 + ln n) for n < LOG_TABLE_SIZE (entry 0 unused), from exact decimal arithmetic so
    the table is the same on every machine; the kernel ships these bits."""
    ctx = Context(prec=40)
    return (0.0,) + tuple(f32(float(ctx.add(1, Decimal(n).ln(ctx)))) for n in range(1, LOG_TABLE_SIZE))


def encode(text: str | bytes) -> bytes:
    """The bytes the kernel sees: UTF-8 (lone surrogates as U+FFFD, as JavaScript's TextEncoder
    does), or bytes as they are; at most MAX_INPUT of them."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text[:MAX_INPUT])
    text = text[: MAX_INPUT + 1]  # every character is >= 1 byte; +1 keeps a cut surrogate pair out
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").encode("utf-8")
    return data[:MAX_INPUT]


def normalise(data: bytes) -> bytes:
    """ASCII lower-case, ASCII whitespace runs to one space, none at the ends, first MAX_TEXT bytes."""
    return b" ".join(data[:MAX_INPUT].lower().split())[:MAX_TEXT]


def features(text: str | bytes, dim: int = DIM) -> dict[int, float]:
    """Sparse feature vector, buckets ascending: word unigrams and bigrams, character 3-5-grams of
    the normalised text; float32 values 1 + ln(count), L2-normalised."""
    t = normalise(encode(text))
    tokens = _TOKEN.findall(t)
    counts: dict[int, int] = {}
    hw, hb, hc = _fnv1a(b"w:"), _fnv1a(b"b:"), _fnv1a(b"c:")
    hashes = [_fnv1a(tok, hw) for tok in tokens]
    hashes += [_fnv1a(b + b" " + c, hb) for b, c in zip(tokens, tokens[1:])]
    p = b" " + t + b" "
    size = len(p)
    for i in range(size - 2):
        h = hc
        for byte in p[i : i + 3]:
            h = ((h ^ byte) * _FNV_PRIME) & _MASK
        hashes.append(h)
        if i + 4 <= size:
            h = ((h ^ p[i + 3]) * _FNV_PRIME) & _MASK
            hashes.append(h)
        if i + 5 <= size:
            h = ((h ^ p[i + 4]) * _FNV_PRIME) & _MASK
            hashes.append(h)
    for h in hashes:
        index = h % dim
        counts[index] = counts.get(index, 0) + 1
    table = log_table()
    vector = [(i, table[min(c, LOG_TABLE_SIZE - 1)]) for i, c in sorted(counts.items())]
    sumsq = 0.0
    for _, v in vector:
        sumsq = f32(sumsq + f32(v * v))
    norm = f32(math.sqrt(sumsq))
    return {i: f32(v / norm) for i, v in vector}


def _exp_neg(d: float) -> float:
    """exp(d) for d <= 0 in double precision from + - * / only: the kernel's exp_neg, step by step."""
    if not d >= -104.0:
        return 0.0
    k = int(-d * 1.4426950408889634 + 0.5)
    r = d + float(k) * 0.693147180369123816490
    r = r + float(k) * 1.90821492927058770002e-10
    p = 1.0
    for n in range(12, 0, -1):
        p = 1.0 + p * r / float(n)
    return p * math.ldexp(1.0, -k)


@dataclass(frozen=True)
class Classifier:
    labels: tuple[str, ...]
    dim: int
    bias: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]  # one row per label

    def probabilities(self, text: str | bytes) -> dict[str, float]:
        """The kernel's probabilities, bit for bit (float32 values as Python floats)."""
        x = list(features(text, self.dim).items())
        scores = []
        for b, row in zip(self.bias, self.weights):
            s = b
            for i, v in x:
                s = f32(s + f32(row[i] * v))
            scores.append(s)
        top = max(scores)
        exps = [f32(_exp_neg(f32(s - top))) for s in scores]
        total = 0.0
        for e in exps:
            total = f32(total + e)
        return {label: f32(e / total) for label, e in zip(self.labels, exps)}

    def predict(self, text: str | bytes) -> tuple[str, float]:
        probs = self.probabilities(text)
        label = max(probs, key=probs.get)
        return label, probs[label]

    def save(self, path: Path, *, build_edge: bool | None = None) -> None:
        """Write the weights (raw float16 weights, raw float32 biases; never decimal text). Saving
        the committed weights file also rebuilds edge/classifier.wasm (build_edge=None)."""
        rows = b"".join(struct.pack(f"<{self.dim}e", *row) for row in self.weights)
        bias = struct.pack(f"<{len(self.bias)}f", *self.bias)
        path.write_text(
            json.dumps(
                {
                    "labels": list(self.labels),
                    "dim": self.dim,
                    "bias_f32_b64": base64.b64encode(bias).decode(),
                    "weights_f16_b64": base64.b64encode(rows).decode(),
                },
                indent=1,
            )
        )
        if build_edge or (build_edge is None and Path(path).resolve() == WEIGHTS):
            from tasks.edge_build import build

            build(self)

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> Classifier:
        data = json.loads(Path(path).read_text())
        dim, labels = int(data["dim"]), tuple(data["labels"])
        raw = base64.b64decode(data["weights_f16_b64"])
        values = struct.unpack(f"<{dim * len(labels)}e", raw)
        rows = tuple(tuple(values[k * dim : (k + 1) * dim]) for k in range(len(labels)))
        if "bias_f32_b64" in data:
            bias = struct.unpack(f"<{len(labels)}f", base64.b64decode(data["bias_f32_b64"]))
        else:  # the older format: decimal text
            bias = tuple(f32(float(b)) for b in data["bias"])
        return cls(labels, dim, tuple(bias), rows)


@lru_cache(maxsize=8192)
def _training_features(text: str) -> dict[int, float]:
    """features(text), kept across the folds of cross_validate (callers only read it)."""
    return features(text)


def train(texts: list[str], labels: list[str], *, epochs: int = 800, lr: float = 2.0, l2: float = 1e-5) -> Classifier:
    """Softmax regression by full-batch gradient descent, classes weighted by inverse frequency;
    deterministic for the same data."""
    import numpy as np

    names = tuple(sorted(set(labels), key=LABELS.index))
    y = np.array([names.index(label) for label in labels])
    x = np.zeros((len(texts), DIM))
    for row, text in enumerate(texts):
        for i, v in _training_features(text).items():
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
    # rounded as stored (float16 weights, float32 biases), so the model is the one that ships
    return Classifier(
        names, DIM, tuple(f32(float(v)) for v in b), tuple(tuple(float(v) for v in row.astype(np.float16)) for row in w)
    )


SEED = Path(__file__).resolve().parents[1] / "homeskillet" / "data" / "task_seed.yaml"
ROUTERBENCH_LABELS = {
    "arc_challenge_train.csv": "multiple_choice",
    "winograde_train.csv": "multiple_choice",
    "mbpp_train.csv": "code",
}


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
    """The seed examples plus the first `per_file` prompts of each RouterBench file in the folder
    (None: the seed examples alone); a folder without them is an error, not a smaller set."""
    import pandas as pd
    import yaml

    texts, labels = [], []
    for label, examples in yaml.safe_load(SEED.read_text()).items():
        texts += examples
        labels += [label] * len(examples)
    if routerbench is not None:
        missing = [name for name in ROUTERBENCH_LABELS if not (routerbench / name).exists()]
        if missing:
            raise InvalidRequest(f"{routerbench}: no RouterBench file {', '.join(missing)}")
        for name, label in ROUTERBENCH_LABELS.items():
            prompts = pd.read_csv(routerbench / name, usecols=["prompt"])["prompt"].head(per_file)
            texts += [last_question(p) for p in prompts]
            labels += [label] * len(prompts)
    return texts, labels


def cross_validate(texts: list[str], labels: list[str], folds: int = 5) -> dict[str, float]:
    """Accuracy per label (and overall) of models trained without each fold, on that fold."""
    order = sorted(range(len(texts)), key=lambda i: _fnv1a(texts[i]))  # a fixed shuffle
    hits: dict[str, list[int]] = {}
    for k in range(folds):
        test = set(order[k::folds])
        model = train(
            [t for i, t in enumerate(texts) if i not in test], [y for i, y in enumerate(labels) if i not in test]
        )
        for i in test:
            hits.setdefault(labels[i], []).append(int(model.predict(texts[i])[0] == labels[i]))
    scores = {label: sum(h) / len(h) for label, h in hits.items()}
    scores["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return scores
