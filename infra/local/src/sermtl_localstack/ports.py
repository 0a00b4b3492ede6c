"""Loopback ports: free ones to start a server on, and whether one is taken or answering.

Every server of the local stack listens on 127.0.0.1 only (LOOPBACK)."""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p + 10000 free as well: SeaweedFS puts each gRPC service there."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on loopback")


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (SO_REUSEADDR as servers use it, so TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def port_open(port: int | None, timeout_s: float = 1.0) -> bool:
    if not port:
        return False
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=timeout_s):
        return True
    return False
