"""How busy the machine is: CPU ticks of the whole machine and of this process, and a Timer that reports others' share."""

from __future__ import annotations

import os
import time

HZ = os.sysconf("SC_CLK_TCK")


def machine_busy() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]  # all but idle and iowait, in clock ticks


def own_cpu() -> float:
    t = os.times()
    return (t.user + t.system) * HZ


class Timer:
    """Wall time of a block, and the share of the machine's CPUs used by other processes meanwhile."""

    def __enter__(self) -> "Timer":
        self._busy, self._own, self._t0 = machine_busy(), own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        others = (machine_busy() - self._busy) - (own_cpu() - self._own)
        self.others = max(0.0, others / HZ / (self.seconds * (os.cpu_count() or 1)))
