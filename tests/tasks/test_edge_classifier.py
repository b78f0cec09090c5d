"""The request classifier at the edge (`tasks.edge_classifier`): one WebAssembly binary,
bit-identical with the Python reference, in wasmtime (the flow) and in Node (classifier.mjs, the
worker); numbers printed as JavaScript prints them. Pure: no server."""

from __future__ import annotations

import base64
import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tasks.classifier import (
    LABELS,
    MAX_INPUT,
    MAX_TEXT,
    encode,
    f32,
    training_examples,
)
from tasks.edge_build import WASM
from tasks.edge_classifier import js_number, to_json
from tests.support import HOMESKILLET

ROOT = Path(__file__).resolve().parents[2]
EDGE = ROOT / "edge"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")

# Node: classify the inputs of a JSON file (strings as JS strings, {"b64": …} as bytes); one line
# each: the label and the float32 bits of the probabilities.
NODE_PARITY = """
import { readFileSync } from "node:fs";
const { loadClassifier } = await import(process.argv[2]);
const c = await loadClassifier();
const inputs = JSON.parse(readFileSync(process.argv[3], "utf8"));
const out = [];
for (const x of inputs) {
  const [best, p] = c.raw(typeof x === "string" ? x : Buffer.from(x.b64, "base64"));
  out.push(c.labels[best] + " " + Array.from(new Uint32Array(p.buffer)).map((b) => b.toString(16)).join(","));
}
process.stdout.write(out.join("\\n") + "\\n");
"""


def hostile(rng: random.Random, n: int) -> list[str]:
    """Strings that break naive text rules: emoji (ZWJ sequences, flags, skin tones), combining
    marks, İ and other case-mapping oddities, NEL, NBSP, vertical tab and other whitespace, RTL,
    CJK, controls, lone surrogates, long and empty inputs."""
    pieces = [
        "😀",
        "👩‍👩‍👧",
        "🇫🇷",
        "👍🏽",
        "e\u0301",
        "\u0308",
        "İ",
        "ı",
        "ß",
        "ǅ",
        "Σ",
        "ﬁ",
        "\u0085",
        "\u00a0",
        "\u000b",
        "\u000c",
        "\u2028",
        "\u3000",
        "\u200b",
        "\ufeff",
        "\t",
        "\r\n",
        " ",
        "  ",
        "مرحبا",
        "שלום",
        "漢字",
        "日本語",
        "Ωμέγα",
        "Привет",
        "\x00",
        "\x7f",
        "\udc80",
        "\ud83d",
        "A",
        "Z",
        "é",
        "É",
        "$",
        "--",
        "Translate",
        "SOLVE",
        "x = 3",
        "def f():",
        "A) yes\nB) no",
        "Summarize:",
        "?",
        "!!!",
        "1,234.5",
    ]
    words = ["what", "is", "the", "capital", "of", "france", "write", "python", "code", "hello", "how", "are", "you"]
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 2, 5, 20, 60, 200])
        out.append("".join(rng.choice(pieces) if rng.random() < 0.6 else rng.choice(words) + " " for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def prompts() -> list[str | bytes]:
    texts, _ = training_examples(ROUTERBENCH)
    rng = random.Random(12)
    emoji_at_cut = "a" * (MAX_INPUT - 2) + "😀" + "tail"  # the 65,536-byte cut splits a 4-byte character
    pair_at_cut = "b" * MAX_INPUT + "😀"  # the string cut at MAX_INPUT + 1 units splits a surrogate pair
    special = [
        "",
        " ",
        "\u0085",
        "\u00a0",
        "\x0b",
        "İstanbul İ",
        "ﬁnance",
        "x" * 100_000,
        "Solve " * 20_000,
        " \t\n" * 40_000 + "translate this",
        "é" * (MAX_TEXT // 2 + 3),
        "a" * (MAX_TEXT - 1) + "é",
        emoji_at_cut,
        pair_at_cut,
        "\ud83d\ude00 paired by hand",
        "lone \udc80 low",
        "lone \ud83d high",
    ]
    raw = [
        b"\xff\xfe\xfd",
        b"caf\xe9 au lait",
        b"\xc3",
        b"\xed\xa0\x80 surrogate as UTF-8",
        b"\x80" * 70_000,
        bytes(range(256)) * 300,
        b"Translate \xe0\x80\x80 overlong",
    ]
    generated = hostile(rng, max(0, 1_000 - len(texts)) + 400)
    return [*texts, *special, *raw, *generated]


def bits(probs) -> str:
    return ",".join(f"{b:x}" for b in struct.unpack(f"<{len(probs)}I", struct.pack(f"<{len(probs)}f", *probs)))


def test_wasm_exports_and_labels(wasm):
    assert wasm.labels == LABELS
    assert WASM.stat().st_size < 200_000


@needs_node
def test_python_wasmtime_and_node_agree_bit_for_bit(prompts, reference, wasm, tmp_path):
    assert len(prompts) >= 1_000
    expected = []
    for p in prompts:
        probs = reference.probabilities(p)
        best = max(probs, key=probs.get)
        expected.append(f"{best} {bits(probs.values())}")
        index, wasm_probs = wasm.raw(p)
        assert f"{LABELS[index]} {bits(wasm_probs)}" == expected[-1], repr(p[:80])
    inputs = [p if isinstance(p, str) else {"b64": base64.b64encode(p).decode()} for p in prompts]
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))  # lone surrogates travel as \\udXXX escapes
    script = tmp_path / "parity.mjs"
    script.write_text(NODE_PARITY)
    out = subprocess.run(
        [NODE, script, (EDGE / "classifier.mjs").as_uri(), tmp_path / "inputs.json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == len(expected)
    mismatches = [(prompts[i][:60], a, b) for i, (a, b) in enumerate(zip(out, expected)) if a != b]
    assert not mismatches, mismatches[:3]
    # the prompts are not degenerate: many labels and many distinct distributions
    assert len({e.split()[0] for e in expected}) == len(LABELS) and len(set(expected)) > 900


def test_bad_input_has_one_defined_behaviour(reference, wasm):
    for model in (reference, wasm):
        # invalid UTF-8 is hashed as the bytes it is, not replaced or rejected
        assert model.probabilities(b"caf\xe9 au lait") != model.probabilities("caf\ufffd au lait")
        assert model.probabilities(b"caf\xc3\xa9") == model.probabilities("café")
        # a lone surrogate in a str is U+FFFD (as JavaScript's TextEncoder does); a pair is its character
        assert model.probabilities("lone \udc80") == model.probabilities("lone \ufffd")
        assert model.probabilities("\ud83d\ude00 hi") == model.probabilities("😀 hi")
        # oversize: only the first MAX_INPUT bytes count, whatever follows
        head = "Translate this into German. " + "z" * (MAX_INPUT - 28)
        assert len(head.encode()) == MAX_INPUT
        assert model.probabilities(head + "Solve x + 1 = 2") == model.probabilities(head)
        assert model.probabilities(head.encode() + b"\xff" * 10) == model.probabilities(head)
    assert encode("a" * (MAX_INPUT - 1) + "😀") == b"a" * (MAX_INPUT - 1) + b"\xf0"  # cut inside a character


@needs_node
def test_numbers_print_as_javascript_prints_them(tmp_path):
    rng = random.Random(5)
    values = [
        0.0,
        1.0,
        0.5,
        1e-7,
        1.2e-7,
        9.99e-7,
        1e-6,
        123e-9,
        1e21,
        1.5e21,
        1e20,
        2**-149,
        3.4028234663852886e38,
        0.1,
        1 / 3,
        123456789.0,
        1.7976931348623157e308,
        5e-324,
    ]
    values += [f32(rng.random() * 10 ** rng.randint(-45, 0)) for _ in range(3_000)]
    values += [rng.random() * 10 ** rng.randint(-300, 300) for _ in range(1_000)]
    (tmp_path / "v.json").write_text(json.dumps([repr(v) for v in values]))
    out = subprocess.run(
        [
            NODE,
            "-e",
            "const v = JSON.parse(require('fs').readFileSync(process.argv[1], 'utf8'));"
            "console.log(v.map((s) => String(Number(s))).join('\\n'))",
            tmp_path / "v.json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [js_number(v) for v in values]


def cli(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(
        [HOMESKILLET, "classify", *args], input=stdin, capture_output=True, check=True
    ).stdout.decode()


@needs_node
@pytest.mark.usefixtures("local_services")  # the `homeskillet` executable
def test_cli_json_equals_node(tmp_path, reference):
    lines = [
        b"Solve 4x - 8 = 12 for x.",
        b"Translate 'where is the station' into Spanish.",
        b"",
        b"\xff\xfe bad bytes",
        "İstanbul\u00a0NBSP\u0085NEL 😀 e\u0301".encode(),
        b"x" * 70_000,
        b"What is the capital of Peru?",
    ]
    stdin = b"\n".join(lines) + b"\n"
    (tmp_path / "in.txt").write_bytes(stdin)
    node = subprocess.run(
        [
            NODE,
            "--input-type=module",
            "-e",
            "import { readFileSync } from 'node:fs';"
            f"const {{ loadClassifier }} = await import({json.dumps((EDGE / 'classifier.mjs').as_uri())});"
            "const c = await loadClassifier(); const data = readFileSync(process.argv[1]);"
            "let start = 0; for (let i = 0; i < data.length; i++) if (data[i] === 10) {"
            "  console.log(JSON.stringify(c.classify(data.subarray(start, i)))); start = i + 1; }",
            tmp_path / "in.txt",
        ],
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert node.count("\n") == len(lines)
    assert cli("--json", stdin=stdin) == node
    assert cli("--json", "--engine", "python", stdin=stdin) == node
    for line, out in zip(lines, node.splitlines()):
        probs = reference.probabilities(line)
        assert json.loads(out) == {"label": max(probs, key=probs.get), "probabilities": probs}
        assert out == to_json(max(probs, key=probs.get), probs)
    # TEXT arguments: strings in Node, the same text
    texts = ["Write a Python function that reverses a string.", "Summarize: the meeting moved to Friday."]
    node_args = subprocess.run(
        [
            NODE,
            "--input-type=module",
            "-e",
            f"const {{ loadClassifier }} = await import({json.dumps((EDGE / 'classifier.mjs').as_uri())});"
            "const c = await loadClassifier(); for (const t of process.argv.slice(1)) console.log(JSON.stringify(c.classify(t)));",
            *texts,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert cli("--json", *texts) == node_args
    plain = cli(*texts).splitlines()
    assert [line.split("\t")[0] for line in plain] == [json.loads(o)["label"] for o in node_args.splitlines()]


@needs_node
def test_the_worker_answers_classify_and_forwards_by_task_type(wasm):
    texts = [
        "Solve 4x - 8 = 12 for x.",
        "Translate 'good night' into German.",
        "Write a Python function that returns the largest element of a list.",
    ]
    script = f"""
const {{ default: worker, createWorker }} = await import({json.dumps((EDGE / "worker.mjs").as_uri())});
const texts = {json.dumps(texts)};
const out = {{ classify: [], forwarded: [] }};
for (const text of texts) {{
  const r = await worker.fetch(new Request("https://edge.example/classify", {{ method: "POST",
    headers: {{ "content-type": "application/json" }}, body: JSON.stringify({{ text }}) }}));
  out.classify.push([r.status, await r.json()]);
}}
const seen = [];
const routed = createWorker({{ endpoints: {{ math: "https://math.example/pool", default: "https://hs.example" }},
  fetch: async (req) => {{ seen.push([req.url, req.headers.get("x-homeskillet-task-type"), await req.text()]);
                           return new Response("forwarded"); }} }});
for (const prompt of texts) {{
  const r = await routed.fetch(new Request("https://edge.example/v1/chat/completions", {{ method: "POST",
    headers: {{ "content-type": "application/json" }}, body: JSON.stringify({{ prompt }}) }}));
  out.forwarded.push(await r.text());
}}
out.seen = seen;
const none = await createWorker({{ endpoints: {{}} }}).fetch(new Request("https://edge.example/v1/completions", {{ method: "POST", body: "hi" }}));
out.unrouted = none.status;
console.log(JSON.stringify(out));
"""
    result = json.loads(
        subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, check=True).stdout
    )
    labels = [wasm.predict(t)[0] for t in texts]
    assert labels == ["math", "translate", "code"]
    assert [status for status, _ in result["classify"]] == [200] * 3
    assert [body["label"] for _, body in result["classify"]] == labels
    assert [body["probabilities"] for _, body in result["classify"]] == [wasm.probabilities(t) for t in texts]
    assert result["forwarded"] == ["forwarded"] * 3
    assert [s[0] for s in result["seen"]] == [
        "https://math.example/pool/v1/chat/completions",
        "https://hs.example/v1/chat/completions",
        "https://hs.example/v1/chat/completions",
    ]
    assert [s[1] for s in result["seen"]] == labels
    assert [json.loads(s[2])["prompt"] for s in result["seen"]] == texts
    assert result["unrouted"] == 502
