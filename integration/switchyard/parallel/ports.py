"""A free TCP port for a server or a rendezvous that binds it a moment later."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10000  # below: well-known and registered services
_TRIES = 200


def _ephemeral_start() -> int:
    """First port of the range the OS hands out for outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts higher (49152)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, chosen below the OS's ephemeral range.

    ``bind(0)`` returns a port from the ephemeral range, which the OS also gives every outgoing connection:
    between choosing it and the server binding it, a gloo / NCCL / TCPStore connection of the same job can
    take it ("address already in use": seen in CI for the HTTP port of a 2-rank server). Ports below the
    range are only ever taken by an explicit bind, so the window is left to other explicit binds alone.
    """
    rng = random.SystemRandom()  # not the global RNG: tests seed it, and parallel workers would collide
    high = _ephemeral_start()
    for _ in range(_TRIES if high > _LOWEST else 0):
        port = rng.randrange(_LOWEST, high)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the ephemeral range: any free port
        sock.bind((host, 0))
        return sock.getsockname()[1]
