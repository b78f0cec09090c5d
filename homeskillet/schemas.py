"""The shared vocabulary: pydantic models every layer imports. No behaviour beyond validation."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from homeskillet.urls import check_url

Tier = Literal["dedicated", "preemptible"]
EPS = 1e-9  # tolerance when comparing sums of TFLOPS, GB or US$: float rounding, never a margin
# The largest prompt any surface accepts, in characters: checked before any work (a split, a flow
# run). Map-reduce summaries of 15 chunks of the largest shipped context fit well inside it.
MAX_PROMPT_CHARS = 128 * 1024
# The longest a request may wait for pool capacity: a waiting request holds a connection and a
# place in its tenant's concurrency cap, so it cannot wait without end.
MAX_CAPACITY_WAIT_S = 120.0
# A request's own stop sequences (OpenAI's bounds): a few, short, never empty (an empty one would
# stop every call before its first token).
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64

BackendName = Literal["local", "hostedai"]  # `connectors.backend.Backend` is the interface
PromptStyle = Literal["chat", "completion"]
# what the request classifier tells apart, plus "reduce" (the combining step of a map-reduce plan)
TaskType = Literal[
    "multiple_choice", "factual_qa", "math", "code", "summarize", "translate", "chat", "extract", "reduce"
]
AllocationState = Literal["active", "released", "expired"]
Strategy = Literal["single", "cascade", "ensemble", "moa", "auto", "learned"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- the request --------------------------------------------------------------------------


class Constraints(_Frozen):
    max_cost_usd: float | None = Field(None, gt=0, description="Upper bound on the request's estimated cost.")
    allowed_models: list[str] | None = Field(None, description="Only these catalog models may run fragments.")
    tier: Tier | None = Field(None, description="Only pools of this tier; None means the cheapest that fits.")
    pool: str | None = Field(None, description="Run every fragment on this pool.")
    max_tokens: int = Field(128, ge=1, le=4096, description="Output tokens per fragment.")
    capacity_wait_s: float | None = Field(
        None, ge=0, le=MAX_CAPACITY_WAIT_S, description="How long to wait for pool capacity, in seconds."
    )
    backend: BackendName = Field("local", description="Where GPU shares come from: this machine or hosted·ai.")
    fallback_backend: BackendName | None = Field(None, description="Used while the backend's circuit is open.")
    on_preemption: Literal["same_tier", "dedicated"] = Field(
        "same_tier", description="Where a preempted fragment is re-run."
    )
    split: bool = Field(True, description="False keeps the prompt as one fragment (e.g. a few-shot prompt).")
    task_type: TaskType | None = Field(
        None, description="The task type of the request's fragments, when the caller knows it; None: classified."
    )
    quality_cost: float | None = Field(
        None,
        ge=0,
        le=100,
        description="The learned router's trade-off: how much probability of a right answer the request gives "
        "up to avoid the dearest candidate's cost (0: the likeliest right model whatever it costs; larger: cheaper). "
        "None: the covenant's, else the router's default.",
    )
    samples: int = Field(
        1,
        ge=1,
        le=5,
        description="A cascade's first model answers this many times (sampled); the answer stands when most agree.",
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature of every model call; None: 0 (greedy, repeatable)."
    )
    stop: list[str] | None = Field(
        None,
        max_length=MAX_STOP_SEQUENCES,
        description="Stop sequences of every model call, added to the model's own (the catalog's `stop`).",
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings_bounded(cls, stop: list[str] | None) -> list[str] | None:
        for i, s in enumerate(stop or []):
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}] is {len(s)} characters; each stop sequence is 1 to {MAX_STOP_CHARS}")
        return stop


class ChatTurn(_Frozen):
    """One earlier turn of a conversation, sent with every fragment of the request as context."""

    role: Literal["system", "user", "assistant"]
    content: str


class InferenceRequest(_Frozen):
    tenant: str = Field(min_length=1)
    prompt: str
    context: list[ChatTurn] = Field(
        [], description="The system prompt and earlier turns, in order; every fragment's model call sees them."
    )
    strategy: Strategy = "single"
    constraints: Constraints = Constraints()
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {len(value)} characters; at most {MAX_PROMPT_CHARS}")
        if not value.strip():
            raise ValueError("prompt is empty")
        return value.strip()

    @model_validator(mode="after")
    def _prompt_and_context_bounded(self) -> InferenceRequest:
        # the context goes to every fragment's model call: it counts against the same bound as the prompt
        context = sum(len(turn.content) for turn in self.context)
        if len(self.prompt) + context > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt ({len(self.prompt)} characters) and context ({context} characters in "
                f"{len(self.context)} turns) are {len(self.prompt) + context} characters; at most {MAX_PROMPT_CHARS}"
            )
        return self


# --- the plan -----------------------------------------------------------------------------


class Fragment(_Frozen):
    id: str
    text: str = Field(description="The fragment's prompt; {name} fields are filled from upstream answers.")
    task_type: TaskType
    depends_on: list[str] = []
    est_prompt_tokens: int = Field(ge=1)


class Plan(_Frozen):
    """Fragments listed so that each depends only on fragments before it (a DAG in topological order)."""

    request_id: str
    fusion: Literal["ordered", "reduce"]
    fragments: list[Fragment] = Field(min_length=1)

    @model_validator(mode="after")
    def _dependencies_come_first(self) -> Plan:
        seen: set[str] = set()
        for fragment in self.fragments:
            if fragment.id in seen:
                raise ValueError(f"fragment id {fragment.id} appears twice")
            unknown = [d for d in fragment.depends_on if d not in seen]
            if unknown:
                raise ValueError(f"fragment {fragment.id} depends on {unknown}, which do not come before it")
            seen.add(fragment.id)
        return self


# --- the catalog --------------------------------------------------------------------------


class LlamaCppServing(_Frozen):
    """A GGUF file shipped in a PyPI package, served locally by llama.cpp."""

    kind: Literal["llama_cpp"] = "llama_cpp"
    package: str = Field(description="Importable package that holds the GGUF.")
    file: str | None = Field(None, description="GGUF file name inside the package (glob allowed).")
    assemble: bool = Field(False, description="The package builds the file with its assemble() function.")


class OpenAIServing(_Frozen):
    """A model already served behind an OpenAI-compatible endpoint."""

    # a refused base_url may carry credentials (user:password@): errors name the problem, not the input
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="Base URL ending in /v1.")
    model: str = Field(description="Model name the endpoint expects.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")

    @field_validator("base_url")
    @classmethod
    def _base_url_is_a_base(cls, value: str) -> str:
        # the operator writes the catalog, and local model servers listen on loopback: private
        # hosts are allowed; a scheme other than http(s), credentials, a query or a fragment are not
        return check_url(value, what="serving.base_url", allow_private=True)


class ModelSpec(_Frozen):
    name: str
    family: str
    parameters_m: float = Field(gt=0, description="Parameters, in millions.")
    context_length: int = Field(gt=0)
    prompt_style: PromptStyle
    stop: list[str] = []
    tflops: float = Field(ge=0)
    vram_gb: float = Field(ge=0)
    tokens_per_second: float = Field(gt=0, description="Measured decode throughput, for estimates.")
    cost_per_1k_tokens: float = Field(0.0, ge=0, description="Per-token price (remote APIs); 0 for self-hosted.")
    task_types: dict[TaskType, float] = Field(description="Quality 0..1 per task type: a prior, or measured.")
    measured_task_types: list[TaskType] = Field(
        default_factory=list, description="Task types whose quality the benchmark measured (set by the loader)."
    )
    serving: Annotated[LlamaCppServing | OpenAIServing, Field(discriminator="kind")]


class HostedAIMatch(_Frozen):
    """Rules that find the hosted·ai pools behind a catalog pool on an account whose pool names
    nobody typed into `hostedai_pools`: the tier from name/label patterns, the GPU type, the price.
    Unset fields take the tier's defaults (connectors.hostedai_backend.TIER_PATTERNS)."""

    patterns: list[str] | None = Field(
        None, description="Regexes (case-insensitive) on a pool's name or label that mark this tier."
    )
    exclude: list[str] | None = Field(None, description="Regexes that rule a pool out (default: the other tier's).")
    unmarked: bool | None = Field(
        None, description="Whether a pool that no pattern marks counts (default: for dedicated, not for preemptible)."
    )
    gpu_types: list[str] = Field([], description="GPU models allowed, e.g. L4 or A100-80GB (default: any card known).")
    max_price_per_vgpu_hour: float | None = Field(None, ge=0, description="US$ per vGPU-hour at most.")

    @field_validator("patterns", "exclude")
    @classmethod
    def _regexes(cls, value: list[str] | None) -> list[str] | None:
        import re

        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from None
        return value


class PoolSpec(_Frozen):
    """A pool of GPU capacity. For hosted·ai it is the share each tenant subscribes to, carved from
    the hosted·ai pools listed in `hostedai_pools` (names or ids, tried by price and availability),
    or, when the account offers none of those, from the pools that `hostedai_match` finds."""

    id: str
    backend: BackendName = "local"
    tier: Tier
    tflops: float = Field(gt=0)
    vram_gb: float = Field(gt=0)
    price_per_hour: float = Field(ge=0, description="US$ per hour for the whole pool (an estimate for hosted·ai).")
    hostedai_pools: list[str] = []
    hostedai_match: HostedAIMatch = HostedAIMatch()
    region: str | None = Field(None, description="Where the pool's GPUs are; local pools are in region 'local'.")

    @model_validator(mode="before")
    @classmethod
    def _local_pools_are_local(cls, data):
        if isinstance(data, dict) and data.get("region") is None and data.get("backend", "local") == "local":
            return {**data, "region": "local"}
        return data


class CardSpec(_Frozen):
    """A GPU model's peak dense FP16 TFLOPS and its memory."""

    tflops: float = Field(gt=0)
    vram_gb: float = Field(gt=0)


class Covenant(_Frozen):
    """A tenant's contract with the orchestrator; every term left out (None) is unlimited.

    Its version is a short hash of its content: any change to a term is a new version."""

    allowed_models: list[str] | None = Field(None, description="Only these catalog models.")
    allowed_backends: list[BackendName] | None = Field(None, description="Only these providers of GPU shares.")
    allowed_tiers: list[Tier] | None = Field(None, description="Only pools of these tiers.")
    allowed_pools: list[str] | None = Field(None, description="Only these catalog pools.")
    allowed_regions: list[str] | None = Field(None, description="Only pools in these regions.")
    allowed_strategies: list[Strategy] | None = Field(None, description="Only these routing strategies.")
    max_tflops: float | None = Field(None, ge=0, description="TFLOPS the tenant may hold at once.")
    max_vram_gb: float | None = Field(None, ge=0, description="GB of VRAM the tenant may hold at once.")
    max_concurrent_requests: int | None = Field(None, ge=0, description="Requests running at once.")
    budget_usd_per_day: float | None = Field(None, ge=0, description="Spend per UTC day, US$.")
    budget_usd_per_month: float | None = Field(None, ge=0, description="Spend per UTC month, US$.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="The largest request, in prompt tokens.")
    max_fragments: int | None = Field(None, ge=1, description="The most fragments a request may split into.")
    quality_cost: float | None = Field(
        None, ge=0, le=100, description="The learned router's trade-off for requests that set none (see Constraints)."
    )

    @property
    def version(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    def terms(self) -> dict:
        """The terms that are set (the rest are unlimited)."""
        return self.model_dump(exclude_none=True)


class TenantSpec(_Frozen):
    id: str
    description: str = ""
    covenant: Covenant = Covenant()


class Catalog(_Frozen):
    models: list[ModelSpec] = Field(min_length=1)
    pools: list[PoolSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = Field(min_length=1)
    cards: dict[str, CardSpec] = {}
    default_covenant: Covenant | None = Field(
        None,
        description="The covenant of every tenant that declares none (e.g. a quota, so that no tenant holds every slice).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_covenant(cls, data: object) -> object:
        """A tenant without a covenant of its own gets the catalog's default one."""
        if isinstance(data, dict) and data.get("default_covenant") is not None:
            tenants = [
                {**t, "covenant": data["default_covenant"]} if isinstance(t, dict) and "covenant" not in t else t
                for t in data.get("tenants") or []
            ]
            data = {**data, "tenants": tenants}
        return data


class HostedAICredentials(_Frozen):
    """One tenant's hosted·ai team and API key. The key is a SecretStr: it never shows in a repr."""

    url: str = Field(description="Base URL of the panel's API, e.g. https://panel.example/api")
    api_key: SecretStr
    team_id: str
    auth_header: Literal["x-api-key", "bearer"] = "x-api-key"


# --- routing, allocation, results ---------------------------------------------------------


class ModelChoice(_Frozen):
    fragment_id: str
    model: str
    backend: BackendName = "local"
    pool: str
    tier: Tier
    tflops: float
    vram_gb: float
    est_cost_usd: float
    reason: str


class Allocation(_Frozen):
    """One tenant's slice of a pool, held under its own id; `backend` serves it, so releasing,
    verifying or rolling it back needs nothing but the allocation."""

    allocation_id: str
    tenant: str
    request_id: str
    backend: BackendName = "local"
    pool: str
    model: str
    tflops: float
    vram_gb: float
    endpoint: str
    created_at: datetime
    lease_expires_at: datetime
    state: AllocationState = "active"


class Timings(_Frozen):
    allocate_s: float = 0.0
    first_token_s: float | None = None
    infer_s: float = 0.0
    release_s: float = 0.0


class FragmentResult(_Frozen):
    fragment_id: str
    task_type: TaskType
    text: str
    model: str
    backend: BackendName = "local"
    pool: str
    tier: Tier
    allocation_id: str
    tokens_in: int
    tokens_out: int
    timings: Timings
    cost_usd: float
    reason: str
    attempts: int = 1
    strategy: str = "single"
    models_called: list[str] = []
    allocation_ids: list[str] = []
    confidence: float | None = None
    token_confidence: float | None = Field(
        None, description="The answering model's own probability of its answer, from its token log-probabilities."
    )
    p_correct: dict[str, float] | None = Field(
        None, description="The learned router's P(correct) of its top candidates for this fragment."
    )
    covenant_version: str | None = None
    covenant_terms: list[str] = Field([], description="The covenant terms that narrowed the fragment's route.")


class FusionResult(_Frozen):
    request_id: str
    tenant: str
    answer: str
    fusion: Literal["ordered", "reduce"]
    fragments: list[FragmentResult]
    cost_usd: float
    wall_s: float


class TokenLogprob(_Frozen):
    token: str
    logprob: float
    top: dict[str, float] = Field({}, description="The likeliest tokens at this position and their log-probabilities.")


class Completion(_Frozen):
    """What one OpenAI-compatible call returned."""

    text: str
    tokens_in: int
    tokens_out: int
    first_token_s: float | None = None
    total_s: float
    finish_reason: str | None = None
    cost_usd: float | None = Field(None, description="What the provider says the call cost, if it says.")
    logprobs: list[TokenLogprob] | None = Field(
        None, description="Per answer token its log-probability and its likeliest alternatives, when asked for."
    )


class TelemetryRecord(_Frozen):
    """One fragment attempt, as the telemetry dataset stores it."""

    ts: datetime
    request_id: str
    tenant: str
    fragment_id: str
    task_type: TaskType
    strategy: str
    model: str
    backend: BackendName
    pool: str
    tier: Tier
    allocation_id: str | None
    tflops: float
    vram_gb: float
    queue_s: float | None = None
    allocate_s: float | None = None
    first_token_s: float | None = None
    infer_s: float | None = None
    release_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    outcome: Literal["ok", "error"]
    error_class: str | None = None


class RouteRecord(_Frozen):
    """One learned routing decision, as the routes dataset stores it: what feedback on the answer
    teaches the router. The prompt itself is not kept, only its embedding."""

    ts: datetime
    request_id: str
    tenant: str
    fragment_id: str
    task_type: TaskType
    model: str
    quality_cost: float
    p_correct: dict[str, float]
    embedding: list[float]


class FeedbackRecord(_Frozen):
    """A tenant's judgement of one of its answers (a fragment's, or the whole request's)."""

    ts: datetime
    request_id: str
    tenant: str
    fragment_id: str | None = None
    score: float = Field(ge=0, le=1)
