"""free_port: free now, and outside the range the OS hands to outgoing connections (the CI flake it fixes:
a 2-rank server's HTTP port taken by the job's own gloo connections before uvicorn bound it)."""

from __future__ import annotations

import socket

import switchyard.parallel.ports as ports


def test_port_is_below_the_ephemeral_range_and_bindable() -> None:
    start = ports._ephemeral_start()
    seen = set()
    for _ in range(20):
        port = ports.free_port()
        assert ports._LOWEST <= port < start, (port, start)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # still free right after
        seen.add(port)
    assert len(seen) > 1  # random, not one fixed port that parallel jobs would share


def test_a_taken_port_is_skipped(monkeypatch) -> None:
    free = ports.free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken_port = taken.getsockname()[1]
        candidates = iter([taken_port, taken_port, free])

        class FixedRandom:
            def randrange(self, low: int, high: int) -> int:
                return next(candidates)

        monkeypatch.setattr(ports, "_ephemeral_start", lambda: 60000)
        monkeypatch.setattr(ports.random, "SystemRandom", FixedRandom)
        assert ports.free_port() == free


def test_no_room_below_the_range_falls_back_to_any_free_port(monkeypatch) -> None:
    monkeypatch.setattr(ports, "_ephemeral_start", lambda: ports._LOWEST)
    port = ports.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
