"""A real `lookalike serve` process on a free localhost port, for benchmarks and tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class Service:
    """``lookalike serve INDEX`` on a free localhost port, ready when GET /readyz answers 200."""

    def __init__(self, index_dir: Path | str, *extra: str, api_key: str | None = None, log_dir: Path | None = None,
                 quiet: bool = True, timeout: float = 120):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.index_dir = Path(index_dir)
        env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_API_KEY"}
        if api_key:
            env["LOOKALIKE_API_KEY"] = api_key
        log_dir = Path(log_dir or self.index_dir.parent)
        self.log = open(log_dir / f"serve-{self.port}.log", "w+")
        cmd = [sys.executable, "-m", "lookalike.cli", "serve", str(index_dir), "--port", str(self.port),
               *(["--quiet"] if quiet else []), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        t0 = time.monotonic()
        while time.monotonic() < t0 + timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lookalike serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        self.start_seconds = time.monotonic() - t0
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"lookalike serve did not become ready in {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
