"""Start and stop a server in the background (tests, benchmarks, demos).

    with ServerProcess.start("ckpt/", ep=2, port=8000) as server:   # deepspeed --num_gpus 2 … when ep > 1
        server.wait_ready()
        ...                                                        # exit kills the whole process group

``drain()`` stops it the production way: SIGTERM to rank 0, which finishes the in-flight requests
and then stops every rank; the launcher then exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from switchyard.parallel.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[3]
SERVE_SCRIPT = REPO_ROOT / "launch" / "serve.py"


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, api_key: str | None,
                 under_launcher: bool) -> None:
        self.proc, self.port, self.log_path, self.api_key = proc, port, log_path, api_key
        self.under_launcher = under_launcher
        self.base_url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, model: str | Path, ep: int = 1, port: int | None = None, args: list[str] | None = None,
              env: dict[str, str] | None = None, api_key: str | None = None) -> "ServerProcess":
        """``deepspeed --num_gpus ep launch/serve.py …`` (ep > 1) or ``python launch/serve.py …``; new session."""
        port = port or free_port()
        script_args = ["--model", str(model), "--ep", str(ep), "--port", str(port), *(args or [])]
        if api_key:
            script_args += ["--api-key", api_key]
        if ep > 1:
            launcher = Path(sys.executable).with_name("deepspeed")
            master_port = free_port()
            while master_port == port:  # a just-closed port can be handed out again
                master_port = free_port()
            command = [str(launcher), "--num_gpus", str(ep), "--master_port", str(master_port), str(SERVE_SCRIPT)]
        else:
            command = [sys.executable, str(SERVE_SCRIPT)]
        log = Path(tempfile.mkstemp(prefix="switchyard-serve-", suffix=".log")[1])
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "wb") as out:
            proc = subprocess.Popen(command + script_args, cwd=REPO_ROOT, env=full_env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, port, log, api_key, under_launcher=ep > 1)

    def output(self, tail: int = 8000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout_s: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                    if json.loads(response.read()).get("status") == "ok":
                        return self
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready within {timeout_s:.0f}s:\n{self.output()}")

    def rank0_pid(self) -> int:
        """The process running rank 0 (the HTTP server): the launcher's child with local rank 0."""
        if not self.under_launcher:
            return self.proc.pid
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if "--local_rank=0" in cmdline and any(part.endswith(SERVE_SCRIPT.name) for part in cmdline):
                return child.pid
        raise RuntimeError(f"no rank-0 process under the launcher {self.proc.pid}")

    def drain(self, timeout_s: float = 120.0) -> int:
        """SIGTERM rank 0 and wait for the launcher; returns its exit code (0: every rank exited 0)."""
        os.kill(self.rank0_pid(), signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
