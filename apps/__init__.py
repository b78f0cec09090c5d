"""The entry points: the `homeskillet` CLI, the MCP server, the isolation report, the load test and
the benchmarks. Each is a thin layer over `flows/` and `tasks/`; nothing below imports them."""
