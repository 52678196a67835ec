"""A job whose MASTER_PORT another job holds (a server beside a fine-tune, both on the deepspeed launcher's default
29500) fails with one line naming the port and `--master_port`, not torch's DistNetworkError traceback per rank.

    python -m pytest -q tests/unit/test_master_port_in_use.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from harness import REPO_ROOT

SCRIPT = """
from switchyard.parallel.manager import init_distributed
try:
    init_distributed(backend="gloo", timeout_s=20)
except ValueError as err:
    print("ValueError:", err)
"""


def test_a_taken_master_port_names_the_fix() -> None:
    with socket.socket() as other_job:
        other_job.bind(("127.0.0.1", 0))
        other_job.listen()
        port = other_job.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(REPO_ROOT / "integration")}
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"ValueError: MASTER_PORT={port} on 127.0.0.1 is in use" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert "deepspeed --master_port <port>" in done.stdout
