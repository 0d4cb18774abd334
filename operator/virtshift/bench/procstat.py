"""A process's CPU seconds and memory, from /proc (Linux)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process."""
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak resident set) in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024  # kB
    return out


class ProcWatch:
    """Samples a process every ``every`` seconds until it is stopped or exits: the last CPU
    seconds and the peak RSS seen (so the numbers survive the process's end)."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every = pid, every
        self.cpu = 0.0
        self.peak_rss = 0.0
        self.rss = 0.0
        self.started = time.monotonic()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ProcWatch:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        try:
            self.cpu = cpu_seconds(self.pid)
            mem = memory_mib(self.pid)
        except (OSError, IndexError, ValueError):
            return
        self.rss = mem.get("VmRSS", self.rss)
        self.peak_rss = max(self.peak_rss, mem.get("VmHWM", 0.0), self.rss)

    def _run(self) -> None:
        while not self._halt.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self.sample()
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join()

    def report(self) -> dict[str, Any]:
        self.sample()
        return {"cpu_s": round(self.cpu, 2), "peak_rss_mib": round(self.peak_rss, 1),
                "rss_mib": round(self.rss, 1),
                "wall_s": round(time.monotonic() - self.started, 1),
                "source": f"/proc/{self.pid}/stat (utime+stime) and /proc/{self.pid}/status "
                          "(VmHWM) of the operator process"}
