"""The Prefect API from off the host: its port at the host's first non-loopback address."""

from __future__ import annotations

import socket

import psutil

from apps.isolation.report import Attack, Report, Target
from homeskillet.settings import get_settings


async def attacks(report: Report, target: Target) -> None:
    port = get_settings().prefect_port
    addresses = [
        a.address
        for nic in psutil.net_if_addrs().values()
        for a in nic
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    if not addresses:
        report.rows.append(Attack("reach the Prefect API from off the host", "no non-loopback address", "n/a"))
        return
    with socket.socket() as sock:
        sock.settimeout(2)
        reached = sock.connect_ex((addresses[0], port)) == 0
    with socket.socket() as sock:
        sock.settimeout(2)
        control = sock.connect_ex(("127.0.0.1", port)) == 0
    report.check(
        "reach the Prefect API from off the host",
        f"{addresses[0]}:{port}",
        not reached,
        control=control,
        detail="the embedded server listens on 127.0.0.1 only",
    )
