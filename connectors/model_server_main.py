"""Entry point of one local model server: `python -m connectors.model_server_main --model PATH ...`.

llama-cpp-python's OpenAI-compatible app on 127.0.0.1, with two changes from its own CLI:
requests queue instead of interrupting each other (`interrupt_requests=False`), and the server
exits when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args()

    threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    model = ModelSettings(
        model=args.model,
        model_alias=args.alias,
        n_ctx=args.n_ctx,
        n_threads=args.threads or max(1, os.cpu_count() or 1),
        verbose=False,
    )
    server = ServerSettings(host="127.0.0.1", port=args.port, interrupt_requests=False)
    app = create_app(server_settings=server, model_settings=[model])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
