"""The request classifier through edge/classifier.wasm (wasmtime): what the flow uses.

Same probabilities, bit for bit, as the Python reference in tasks/classifier.py and as
edge/classifier.mjs in JavaScript. `to_json` prints a result exactly as JavaScript's
`JSON.stringify` does (numbers in ECMAScript's shortest round-trip form), so the CLI and Node give
identical text.
"""

from __future__ import annotations

import atexit
import struct
import threading
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from tasks.classifier import MAX_INPUT, encode
from tasks.edge_build import WASM


class WasmClassifier:
    """One wasmtime instance of the kernel; calls are serialised by a lock (the kernel has one
    input buffer)."""

    def __init__(self, path: Path = WASM) -> None:
        import wasmtime

        self._store = wasmtime.Store()
        self._module = module = wasmtime.Module.from_file(self._store.engine, str(path))
        instance = wasmtime.Instance(self._store, module, [])
        exports = instance.exports(self._store)
        self._memory = exports["memory"]
        self._classify = exports["classify"]
        store = self._store
        assert exports["max_input"](store) == MAX_INPUT
        self._input = exports["input_ptr"](store)
        self._probs = exports["probs_ptr"](store)
        names = self._memory.read(
            store, exports["labels_ptr"](store), exports["labels_ptr"](store) + exports["labels_len"](store)
        )
        self.labels: tuple[str, ...] = tuple(names.decode().split("\n"))
        self._unpack = struct.Struct(f"<{len(self.labels)}f").unpack
        self._lock = threading.Lock()
        # freed before the interpreter tears its modules down (wasmtime's finalizers fail after)
        atexit.register(self.close)

    def close(self) -> None:
        with self._lock:
            for handle in (self._module, self._store, self._store.engine):
                handle.close()

    def raw(self, text: str | bytes) -> tuple[int, tuple[float, ...]]:
        """(index of the most probable label, the probabilities in label order)."""
        data = encode(text)
        with self._lock:
            if data:
                self._memory.write(self._store, data, self._input)
            best = self._classify(self._store, len(data))
            probs = self._unpack(self._memory.read(self._store, self._probs, self._probs + 4 * len(self.labels)))
        return best, probs

    def probabilities(self, text: str | bytes) -> dict[str, float]:
        return dict(zip(self.labels, self.raw(text)[1]))

    def predict(self, text: str | bytes) -> tuple[str, float]:
        best, probs = self.raw(text)
        return self.labels[best], probs[best]


@lru_cache
def wasm_classifier() -> WasmClassifier:
    return WasmClassifier()


def js_number(x: float) -> str:
    """`x` as ECMAScript's Number::toString writes it (shortest round-trip digits, as Python's repr)."""
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    _, digits, exponent = Decimal(repr(abs(x))).as_tuple()
    s = "".join(map(str, digits)).rstrip("0")
    exponent += len("".join(map(str, digits))) - len(s)
    k = len(s)
    n = k + exponent  # x = 0.s * 10^n
    if k <= n <= 21:
        out = s + "0" * (n - k)
    elif 0 < n <= 21:
        out = s[:n] + "." + s[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + s
    else:
        e = n - 1
        out = (s if k == 1 else s[0] + "." + s[1:]) + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return sign + out


def to_json(label: str, probabilities: dict[str, float]) -> str:
    """`JSON.stringify({label, probabilities})`, character for character."""
    import json

    probs = ",".join(f"{json.dumps(k)}:{js_number(v)}" for k, v in probabilities.items())
    return f'{{"label":{json.dumps(label)},"probabilities":{{{probs}}}}}'
