"""The supervisor of one machine-wide model server: `python -m connectors.model_server_main ...`.

Started by `connectors.model_server.ModelServers` in its own session, it runs `llama-server`
as its child (which gets SIGKILL if the supervisor dies, so no server outlives its record),
writes the record once the server answers `/health`, and then once a second:
- reads the server's request counters (`/metrics`, with the server's API key, which it reads
  from the key file like the server does); any change, or a request in flight, counts
  as use and touches the `used` file that clients touch when they ask for the endpoint;
- stops the server, under the same lock clients take, when that file is older than `idle_s`
  and no request is in flight;
- exits when llama-server exits (the record goes with it, and the next user starts a new one).
SIGTERM stops the server and removes the record.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from filelock import FileLock

from connectors.model_server import SERVER_ENV, ServerConfig
from connectors.processes import healthy

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def activity(base_url: str, headers: dict[str, str]) -> tuple[float, ...] | None:
    """The server's request counters and in-flight gauges, or None when it does not answer."""
    try:
        response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=2.0)
        if response.status_code != 200:
            return None
        text = response.text
    except httpx.HTTPError:
        return None
    names = ("prompt_tokens_total", "tokens_predicted_total", "requests_processing", "requests_deferred")
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("llamacpp:") and name[9:] in names:
            values[name[9:]] = float(value)
    return tuple(values.get(n, 0.0) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="ServerConfig as JSON")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--used", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    args = parser.parse_args()
    config = ServerConfig(**json.loads(args.config))
    base = f"http://127.0.0.1:{args.port}"
    headers = {"Authorization": f"Bearer {Path(config.api_key_file).read_text().strip()}"}
    print(f"supervisor {os.getpid()}: starting {' '.join(config.command(args.port))}", flush=True)
    env = {**SERVER_ENV, **os.environ}  # an operator's own GOMP_SPINCOUNT wins
    server = subprocess.Popen(config.command(args.port), stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)

    def stop(*_):
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        _remove_record_if_ours(args.record)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    while not healthy(f"{base}/health"):
        if server.poll() is not None:
            print(f"supervisor: llama-server exited with code {server.returncode} at start-up", flush=True)
            sys.exit(1)
        time.sleep(0.1)
    record = {
        "model": config.model,
        "key": config.key,
        "pid": os.getpid(),
        "created": psutil.Process().create_time(),
        "server_pid": server.pid,
        "port": args.port,
        "since": time.time(),
        "slots": config.slots,
        "idle_s": args.idle_s,
    }
    args.used.touch()
    tmp = args.record.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(args.record)

    last = activity(base, headers)
    while True:
        time.sleep(1.0)
        if server.poll() is not None:
            print(f"supervisor: llama-server exited with code {server.returncode}", flush=True)
            _remove_record_if_ours(args.record)
            sys.exit(1)
        now = activity(base, headers)
        if now is not None and (now != last or now[2] or now[3]):
            args.used.touch()
            last = now
        if time.time() - args.used.stat().st_mtime > args.idle_s:
            with FileLock(args.lock):  # clients touch `used` under this lock before they use the server
                current = activity(base, headers)
                if time.time() - args.used.stat().st_mtime > args.idle_s and not (
                    current and (current[2] or current[3])
                ):
                    print(f"supervisor: idle for {args.idle_s:g}s, stopping", flush=True)
                    stop()


def _remove_record_if_ours(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
