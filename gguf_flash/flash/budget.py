"""Sizes and RSS (DESIGN.md section 5: the cap is process RSS, as psutil says): parsing --max-ram,
reading RSS here and sampling it from outside. The plan itself is flash/plan.py."""

from __future__ import annotations

import os
import re

import psutil

from ..errors import InvalidArgumentError
from .plan import MiB

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": MiB, "MB": MiB, "MIB": MiB,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text) -> int:
    """'512K', '220M', '1.5G', '123456' -> bytes (binary units, like llama.cpp's -ctk sizes)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise InvalidArgumentError(f"bad size {text!r} (use e.g. 512K, 220M, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


_statm = (-1, -1)   # (pid, fd of /proc/self/statm opened by that pid): rss() keeps it open
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    """This process's RSS in bytes: psutil's memory_info().rss, which on Linux is /proc/self/statm's
    resident pages. The watchdog asks every token, so on Linux the file stays open and is read with
    one pread (a new psutil.Process per call cost ~130 us of SmolLM2's ~7 ms flash step); reopened in
    a forked child, whose /proc/self is another file."""
    global _statm
    pid = os.getpid()
    if _statm[0] != pid:
        try:
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY))
        except OSError:      # no procfs: psutil's own way
            _statm = (pid, -2)
    if _statm[1] == -2:
        return psutil.Process().memory_info().rss
    return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE


def sample_peak_rss(proc, every: float = 0.005) -> int:
    """Peak RSS (bytes) of the child process `proc` (subprocess.Popen), sampled from outside every
    `every` seconds until it exits: what the cap tests and tools/bench_flash.py compare with a cap."""
    import time
    p, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(every)
    return peak




class PeakSampler:
    """This process's peak RSS, sampled every `every` seconds by a daemon thread, per stretch of work:
    `mark()` returns the peak (bytes) since the previous mark (the converter's peak by phase)."""

    def __init__(self, every: float = 0.01):
        import threading
        self._proc, self._every = psutil.Process(), every
        self._peak, self._total = 0, 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._every):
            self._sample()

    def _sample(self):
        r = self._proc.memory_info().rss
        with self._lock:
            self._peak, self._total = max(self._peak, r), max(self._total, r)

    def mark(self) -> int:
        self._sample()
        with self._lock:
            peak, self._peak = self._peak, 0
        return peak

    @property
    def total(self) -> int:
        return self._total

    def close(self):
        self._stop.set()
        self._thread.join()
