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


def server_ports(n: int, host: str = "127.0.0.1", *, low: int = 20000) -> list[int]:
    """`n` distinct free ports BELOW the kernel's ephemeral range, for servers that bind late.

    A real SGLang server binds its port only after loading its model (a minute on a busy CPU);
    a port from the ephemeral range (`free_ports`) may meanwhile be taken by any outgoing
    connection on the machine (seen: "address already in use"). Ports below the range are
    never handed out by the kernel; they are chosen at random from [low, start of the range)."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            start = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        start = 32768  # Linux's default range starts there
    if start - low < 4 * n:
        return free_ports(n, host)  # no room below the range: the ordinary way
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(low, start)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports
