"""Free TCP ports for the servers and process groups this process starts."""

from __future__ import annotations

import socket


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports nobody listens on at `host` ("" checks every interface). They are held
    open together while chosen, so they differ; another process may still take one before use.
    Use the ports returned, never their neighbours: Linux gives bind(0) odd ports and leaves the
    even ones to connect(), so p + 1 is where this machine's outgoing connections land."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port of `free_ports`."""
    return free_ports(1, host)[0]
