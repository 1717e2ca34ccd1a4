"""Free TCP ports on 127.0.0.1 for the servers and Ray heads the tests start."""

from __future__ import annotations

import contextlib
import socket


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are picked."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
