"""What the benchmarks measure besides wall time: the GIL held by this process (sampled by py-spy)
and another process's CPU (from /proc)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def py_spy() -> str | None:
    """py-spy on PATH, else beside this Python (the venv's)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def server_cpu_s(pid: int) -> float:
    """CPU seconds a process has used (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GilSampler:
    """py-spy sampling, at ``rate`` per second, the stacks of this process that hold the GIL:
    ``start()``, then ``stop()`` returns the seconds some thread held it in between."""

    def __init__(self, samples: Path, rate: int = 200) -> None:
        self.samples, self.rate = samples, rate
        self._spy: subprocess.Popen | None = None

    def start(self) -> GilSampler:
        self._spy = subprocess.Popen([py_spy(), "record", "--pid", str(os.getpid()), "--gil", "--nonblocking",
                                      "--rate", str(self.rate), "--format", "raw", "--output", str(self.samples)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attached
        return self

    def stop(self) -> float:
        self._spy.send_signal(2)  # SIGINT: py-spy writes its samples and exits
        self._spy.wait(60)
        lines = self.samples.read_text().splitlines()
        self.samples.unlink()
        return sum(int(line.rsplit(" ", 1)[1]) for line in lines if line.strip()) / self.rate
