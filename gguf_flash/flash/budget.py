"""The RAM plan and the RSS watchdog (DESIGN.md section 5: the cap is process RSS, as psutil says).

Plan = measured runtime baseline + resident parts (attention, norms, embedding/head, predictors or
gate rows, KV cache, scratch) + window slots split across layers by need. A cap below the must-have
part is refused before anything large is loaded, with the numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psutil

from ..errors import InvalidArgumentError, RamCapError

MiB = 1 << 20
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": MiB, "MB": MiB, "MIB": MiB,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
HEADROOM = 4 * MiB   # the watchdog shrinks the window when RSS comes this close to the cap


def parse_size(text) -> int:
    """'512K', '220M', '1.5G', '123456' -> bytes (binary units, like llama.cpp's -ctk sizes)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise InvalidArgumentError(f"bad size {text!r} (use e.g. 512K, 220M, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def rss() -> int:
    return psutil.Process().memory_info().rss


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


def mib(n) -> str:
    return f"{n / MiB:.0f} MiB"


@dataclass
class Plan:
    cap: int
    baseline: int                 # runtime RSS (Python, numpy, numba, kernels) before the model
    resident: dict                # part -> bytes
    window_bytes: int
    capacities: list              # slots per layer
    head_streamed: bool = False   # output head read from the map and released every token
    notes: list = field(default_factory=list)

    @property
    def must_have(self) -> int:
        return self.baseline + sum(self.resident.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {mib(v)}" for k, v in self.resident.items())
        return (f"cap {mib(self.cap)} = runtime {mib(self.baseline)} + {parts} + window "
                f"{mib(self.window_bytes)} ({sum(self.capacities)} bundle slots)")


def make_plan(cap: int, baseline: int, resident: dict, head_bytes: int, bundle_bytes: list,
              min_slots: list, want_slots: list, path: str) -> Plan:
    """Fit the window into cap - baseline - resident. head_bytes is part of `resident` but may be
    streamed (released after each token) when that is all that does not fit."""
    must = baseline + sum(resident.values())
    min_window = sum(b * n for b, n in zip(bundle_bytes, min_slots))
    streamed = False
    if must + min_window > cap and must - head_bytes + min_window + HEADROOM <= cap and head_bytes:
        resident = dict(resident)
        resident["output head (streamed, 2 MiB chunks)"] = 2 * MiB
        resident.pop("output head", None)
        must += 2 * MiB - head_bytes
        streamed = True
    if must + min_window > cap:
        if head_bytes and not streamed:   # the least that would work streams the head
            must += 2 * MiB - head_bytes
        raise RamCapError(f"{path}: needs at least {mib(must + min_window + (HEADROOM if streamed or head_bytes else 0))} "
                          f"({mib(baseline)} runtime + {mib(must - baseline)} resident + {mib(min_window)} "
                          f"minimum window), cap is {mib(cap)}")
    room = cap - must - HEADROOM
    want = sum(b * n for b, n in zip(bundle_bytes, want_slots))
    if want <= room:
        caps = list(want_slots)
    else:  # scale each layer between its minimum and its want by the same fraction
        extra = max(room - min_window, 0)
        span = max(want - min_window, 1)
        caps = [lo + int((hi - lo) * extra / span) for lo, hi in zip(min_slots, want_slots)]
    window = sum(b * n for b, n in zip(bundle_bytes, caps))
    return Plan(cap, baseline, resident, window, caps, streamed)
