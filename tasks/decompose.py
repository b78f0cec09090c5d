"""Decomposition: a request's prompt becomes a plan, a DAG of fragments (rule-based).

- numbered items ("1. … 2. …", "Q1: …", one per line or inline) become one fragment each;
- several questions or requests in one paragraph become one fragment each, with any plain
  statements kept as shared context in front of each;
- "Summarize …: <long text>" that does not fit one model's context is chunked (map) and the
  chunk summaries are combined by a final fragment that depends on all of them (reduce);
- anything else is one fragment. A fragment that fits no allowed model is an error.

A request may ask not to be split (`split=False`: a few-shot prompt is one question) and may
declare its task type instead of leaving it to the classifier.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from functools import lru_cache

from prefect import task
from prefect.cache_policies import NO_CACHE

from homeskillet.errors import InvalidRequest
from homeskillet.schemas import Fragment, Plan, TaskType
from tasks.classifier import Classifier
from tasks.edge_classifier import WasmClassifier, wasm_classifier

logger = logging.getLogger(__name__)
CHARS_PER_TOKEN = 3  # conservative for English (llama tokenizers average ~4)
PROMPT_OVERHEAD_TOKENS = 48  # chat template and instructions around a fragment
MAX_FRAGMENTS = 16
DECOMPOSE_TIMEOUT_S = 5.0  # far beyond what a prompt within MAX_PROMPT_CHARS takes

_NUMBERED_LINES = re.compile(r"^[ \t]*(?:Q\s*)?\(?(\d{1,2})[.):]\s+", re.IGNORECASE | re.MULTILINE)
_NUMBERED_INLINE = re.compile(r"(?:^|(?<=\s))(?:Q\s*)?\(?(\d{1,2})[.):]\s+", re.IGNORECASE)
_SUMMARY = re.compile(
    r"^\s*(?:please\s+)?(?:summari[sz]e|give (?:me )?a summary of|tl;?dr)\b(?P<instruction>[^\n:]*)[:\n]\s*(?P<body>.+)$",
    re.IGNORECASE | re.DOTALL,
)
_SENTENCE = re.compile(r"(?<=[.?!])\s+(?=[A-Z0-9\"'(])")
_IMPERATIVE = re.compile(
    r"^(?:and\s+|also,?\s+|then\s+)?(?:please\s+)?(?:write|list|name|explain|describe|give|tell|translate|compose|"
    r"compute|calculate|solve|define|suggest|summari[sz]e|compare)\b",
    re.IGNORECASE,
)


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@lru_cache
def request_classifier() -> WasmClassifier | Classifier:
    """The request classifier: edge/classifier.wasm through wasmtime, the binary the edge runs.
    Where the .wasm is not shipped (an image without edge/), the Python reference, which gives
    the same probabilities bit for bit, only ~50x slower."""
    try:
        return wasm_classifier()
    except (FileNotFoundError, ImportError) as exc:
        logger.warning("request classifier: %s; using the Python reference instead of the .wasm", exc)
        return Classifier.load()


def classify(text: str) -> TaskType:
    """The task type of one fragment's text: the request classifier's label ("Summarize …:" is
    always summarize, since the plan's map-reduce depends on it)."""
    if _SUMMARY.match(text):
        return "summarize"
    return request_classifier().predict(text)[0]  # type: ignore[return-value]


def decompose_prompt(
    prompt: str,
    request_id: str,
    max_context: int,
    max_tokens: int,
    split: bool = True,
    task_type: TaskType | None = None,
    max_fragments: int = MAX_FRAGMENTS,
) -> Plan:
    """The plan for a prompt, given the largest context among allowed models and the output budget.

    Time and memory are linear in the prompt: each pass reads it once, and the split stops with
    InvalidRequest as soon as it finds more than `max_fragments` parts (at most MAX_FRAGMENTS), so
    the shared context is never copied into more parts than a request may have."""
    limit = min(max_fragments, MAX_FRAGMENTS)
    budget = max_context - max_tokens - PROMPT_OVERHEAD_TOKENS
    if budget <= 0:
        raise InvalidRequest(f"max_tokens {max_tokens} leaves no room for a prompt in a {max_context}-token context")
    summary = _SUMMARY.match(prompt)
    if split and summary and estimate_tokens(prompt) > budget:
        return _map_reduce(summary.group("body"), request_id, budget, max_context, max_tokens, limit)
    parts = (_numbered_items(prompt, limit) or _asks(prompt, limit) or [prompt]) if split else [prompt]
    fragments = [_fragment(f"f{i}", text, task_type) for i, text in enumerate(parts, start=1)]
    for fragment in fragments:
        if fragment.est_prompt_tokens > budget:
            where = "prompt" if len(fragments) == 1 else f"part {fragment.id}"
            raise InvalidRequest(
                f"{where} is about {fragment.est_prompt_tokens} tokens, beyond every allowed model's context "
                f"(largest {max_context} tokens, {budget} left for the prompt after {max_tokens} output tokens)"
            )
    return Plan(request_id=request_id, fusion="ordered", fragments=fragments)


def fill(fragment: Fragment, upstream: dict[str, str]) -> str:
    """The fragment's prompt with the answers of the fragments it depends on filled in."""
    if not fragment.depends_on:
        return fragment.text
    return fragment.text.format_map({dep: upstream[dep] for dep in fragment.depends_on})


def _fragment(fid: str, text: str, task_type: TaskType | None = None, depends_on: list[str] | None = None) -> Fragment:
    return Fragment(
        id=fid,
        text=text,
        task_type=task_type or classify(text),
        depends_on=depends_on or [],
        est_prompt_tokens=estimate_tokens(text),
    )


class TooManyParts(InvalidRequest):
    """The prompt has more parts than a request may have fragments (the split stopped there)."""

    def __init__(self, limit: int):
        super().__init__(f"prompt has more than {limit} parts; at most {limit} fragments per request")
        self.limit = limit


def _numbered_items(prompt: str, limit: int) -> list[str] | None:
    """Items numbered 1, 2, 3 … in order (at least two); None when the prompt is not a numbered list.
    Numbers at line starts win over numbers inside the text ("1. Say 2.\n2. …")."""
    return _items_marked_by(_NUMBERED_LINES, prompt, limit) or _items_marked_by(_NUMBERED_INLINE, prompt, limit)


def _items_marked_by(pattern: re.Pattern, prompt: str, limit: int) -> list[str] | None:
    expected, picked = 1, []
    for mark in pattern.finditer(prompt):
        if int(mark.group(1)) == expected:
            picked.append(mark)
            expected += 1
    if len(picked) < 2:
        return None
    if len(picked) > limit:
        raise TooManyParts(limit)
    items = []
    for mark, nxt in zip(picked, picked[1:] + [None]):
        text = prompt[mark.end() : nxt.start() if nxt else len(prompt)].strip()
        if text:
            items.append(text)
    return items if len(items) >= 2 else None


def _asks(prompt: str, limit: int) -> list[str] | None:
    """Two or more questions or requests in running text; plain statements become shared context.
    One pass over the sentences; more than `limit` asks is refused before any part is built."""
    asks: list[str] = []
    statements: list[str] = []
    for sentence in _SENTENCE.split(prompt.strip()):
        sentence = sentence.strip()
        if not sentence:
            continue
        if sentence.endswith("?") or _IMPERATIVE.match(sentence):
            asks.append(sentence)
            if len(asks) > limit:
                raise TooManyParts(limit)
        else:
            statements.append(sentence)
    if len(asks) < 2:
        return None
    context = " ".join(statements)
    return [f"{context} {ask}".strip() for ask in asks]


def _map_reduce(body: str, request_id: str, budget: int, max_context: int, max_tokens: int, limit: int) -> Plan:
    instruction = "Summarize this passage in two or three sentences:\n\n"
    chunk_tokens = budget - estimate_tokens(instruction)
    reduce_head = "Combine these partial summaries into one concise summary:\n\n"
    fits = (budget - estimate_tokens(reduce_head)) // (max_tokens + 2)
    most = min(fits, limit - 1)
    # a text longer than `most` full chunks can never fit: refused before it is cut up
    chunks = _chunk(body, chunk_tokens * CHARS_PER_TOKEN) if len(body) <= most * chunk_tokens * CHARS_PER_TOKEN else []
    if not chunks or len(chunks) > most:
        raise InvalidRequest(
            f"text of about {estimate_tokens(body)} tokens needs {len(chunks) or 'more than ' + str(most)} chunks; at most "
            f"{most} summaries fit one combining step in a {max_context}-token context and {limit} fragments"
        )
    maps = [_fragment(f"f{i}", instruction + chunk, "summarize") for i, chunk in enumerate(chunks, start=1)]
    joined = "\n".join(f"- {{{m.id}}}" for m in maps)
    reduce_text = reduce_head + joined
    reduce = Fragment(
        id=f"f{len(maps) + 1}",
        text=reduce_text,
        task_type="reduce",
        depends_on=[m.id for m in maps],
        est_prompt_tokens=estimate_tokens(reduce_head) + len(maps) * (max_tokens + 2),
    )
    return Plan(request_id=request_id, fusion="reduce", fragments=[*maps, reduce])


def _chunk(text: str, max_chars: int) -> list[str]:
    """Split on paragraph, then sentence, then word boundaries into pieces of at most max_chars."""
    pieces: list[str] = []
    for unit in re.split(r"\n\s*\n", text) if len(text) > max_chars else [text]:
        if len(unit) <= max_chars:
            pieces.append(unit)
            continue
        for sentence in _SENTENCE.split(unit):
            while len(sentence) > max_chars:
                cut = sentence.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                pieces.append(sentence[:cut])
                sentence = sentence[cut:].lstrip()
            pieces.append(sentence)
    chunks: list[list[str]] = []  # each chunk's pieces, joined once at the end
    size = 0
    for piece in pieces:
        if chunks and size + 2 + len(piece) <= max_chars:
            chunks[-1].append(piece)
            size += 2 + len(piece)
        elif piece.strip():
            chunks.append([piece])
            size = len(piece)
    return ["\n\n".join(chunk) for chunk in chunks]


async def decompose_off_loop(
    prompt: str,
    request_id: str,
    max_context: int,
    max_tokens: int,
    split: bool = True,
    task_type: TaskType | None = None,
    max_fragments: int = MAX_FRAGMENTS,
) -> Plan:
    """`decompose_prompt` in a worker thread, so that a server's event loop keeps serving every other
    tenant meanwhile; InvalidRequest after DECOMPOSE_TIMEOUT_S (the prompt is bounded, so the
    thread ends soon after)."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(
                decompose_prompt, prompt, request_id, max_context, max_tokens, split, task_type, max_fragments
            ),
            DECOMPOSE_TIMEOUT_S,
        )
    except TimeoutError:
        raise InvalidRequest(f"the prompt took over {DECOMPOSE_TIMEOUT_S:g}s to split; send a shorter one") from None


@task(name="decompose", cache_policy=NO_CACHE, persist_result=False)
async def decompose(
    prompt: str,
    request_id: str,
    max_context: int,
    max_tokens: int,
    split: bool = True,
    task_type: TaskType | None = None,
    max_fragments: int = MAX_FRAGMENTS,
) -> Plan:
    return await decompose_off_loop(prompt, request_id, max_context, max_tokens, split, task_type, max_fragments)
