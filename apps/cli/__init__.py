"""`homeskillet`: run requests, inspect allocations, manage the local Prefect server.

This module builds the command tree (`app`, the console script's entry point) and names every
command; the commands themselves live in one module per group:

- `request`: run, allocations, classify
- `feedback`: feedback
- `covenant`: covenant show
- `server`: server start, stop, status, check
- `routing`: eval-routing, learn-routing, train-classifier
- `bench`: benchmark, cost-report, bench-overhead, bench-mcp, bench-confidence, loadtest, bench-workers
- `mcp`: serve (every surface), mcp serve, tokens create, list, revoke
- `ops`: emulator, credentials, isolation-report

and what they share (consoles, exit codes, running flows until a signal) in `running`. Commands
are registered here in the order `--help` lists them.
"""

from __future__ import annotations

import typer

from apps.cli import bench, covenant, feedback, mcp, ops, request, routing, server

app = typer.Typer(help="Homeskillet: decompose, route, allocate, infer, release, fuse.", no_args_is_help=True)
app.command("run")(request.run)
app.command("serve")(mcp.serve_all)
app.command("allocations")(request.allocations)
app.command("emulator")(ops.emulator)
app.command("credentials")(ops.credentials)
app.command("benchmark")(bench.benchmark)
app.command("cost-report")(bench.cost_report)
app.command("train-classifier")(routing.train_classifier)
app.command("eval-routing")(routing.eval_routing)
app.command("learn-routing")(routing.learn_routing)
app.command("bench-overhead")(bench.bench_overhead)
app.command("bench-mcp")(bench.bench_mcp)
app.command("bench-confidence")(bench.bench_confidence)
app.command("loadtest")(bench.loadtest)
app.command("bench-workers")(bench.bench_workers)
app.command("isolation-report")(ops.isolation_report)
app.command("classify")(request.classify)
app.command("feedback")(feedback.feedback)

server_app = typer.Typer(help="The local services: Prefect server, PostgreSQL, model servers.", no_args_is_help=True)
server_app.command("start")(server.start)
server_app.command("stop")(server.stop)
server_app.command("status")(server.status)
server_app.command("check")(server.check)
app.add_typer(server_app, name="server")

covenant_app = typer.Typer(help="Tenants' covenants: their terms and what they use now.", no_args_is_help=True)
covenant_app.command("show")(covenant.show)
app.add_typer(covenant_app, name="covenant")

mcp_app = typer.Typer(help="The MCP server: Streamable HTTP at /mcp, WebSocket at /ws.", no_args_is_help=True)
mcp_app.command("serve")(mcp.serve)
app.add_typer(mcp_app, name="mcp")

tokens_app = typer.Typer(help="API tokens of the MCP server, one tenant each (stored hashed).", no_args_is_help=True)
tokens_app.command("create")(mcp.tokens_create)
tokens_app.command("list")(mcp.tokens_list)
tokens_app.command("revoke")(mcp.tokens_revoke)
app.add_typer(tokens_app, name="tokens")
