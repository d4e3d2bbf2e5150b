"""A Ray cluster already running on the machine (`ray start --head`): a build joins it by address,
and a build without one starts its own beside it. (Its own file: it stops every Ray process here.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import SAMPLE

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def test_a_build_joins_a_running_cluster_or_starts_its_own_beside_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="token")  # the cluster `ray start` makes asks for its token
    start = subprocess.run([*RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--include-dashboard",
                            "false", "--disable-usage-stats"], capture_output=True, text=True, timeout=180, env=env)
    assert start.returncode == 0, start.stderr
    try:
        build = [sys.executable, "-m", "lookalike.cli", "build", str(SAMPLE / "catalog.csv"), "--json"]
        joined = subprocess.run([*build, "-o", str(tmp_path / "joined"), "--ray", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=600, env=env)
        assert joined.returncode == 0, joined.stderr
        assert json.loads(joined.stdout)["indexed"] == 300
        # without an address: a Ray of its own, even with that cluster running here (Ray would join it,
        # and then refuse the CPUs asked for)
        own = subprocess.run([*build, "-o", str(tmp_path / "own"), "--ray"], capture_output=True, text=True, timeout=600)
        assert own.returncode == 0, own.stderr
        assert json.loads(own.stdout)["indexed"] == 300
        status = subprocess.run([*RAY, "status", "--address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                                timeout=60, env=env)
        assert status.returncode == 0 and "2.0 CPU" in status.stdout, status.stdout + status.stderr  # still up
    finally:
        subprocess.run([*RAY, "stop", "--force"], capture_output=True, timeout=120)
