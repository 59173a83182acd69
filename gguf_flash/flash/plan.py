"""The RAM plan: what stays resident under a cap, chosen by the bytes of reading it saves per token.

A pure function of sizes, calibration frequencies and the disk's throughput (LLM in a flash, section 2:
the cost of a byte is the time to read it at the size it is read). Nothing here touches the model.

Must stay resident (else refuse the cap, with the numbers): the runtime (measured), attention weights,
norms, KV cache, scratch, I/O staging, one selector (exact gate rows, or the predictor where the gate
rows do not fit and it is smaller), the FFN overflow staging (active neurons that are not in the window
are read there in chunks and computed: the window is a cache, never a requirement) and one window slot
per layer. Everything else competes for the rest of the cap by milliseconds of reading saved per token
per byte of RAM:
- the output head: resident saves reading it whole every token, in large sequential reads;
- window slot j of layer l: holds neuron j (rows are stored hot-first) and saves reading its bundle
  with probability freq_l[j]; misses are read at the small-read throughput when they are scattered,
  at the large-read one when the layer's active rows are dense enough that coalescing (reading through
  gaps under gap_bytes) makes long reads of them (on average one active row or more per gap);
- an untied token embedding: saves one row read per token (it is otherwise read row by row).
Greedy by value density; indivisible items that do not fit are skipped for smaller ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import RamCapError

MiB = 1 << 20
HEADROOM = 4 * MiB     # the watchdog shrinks the windows when RSS comes this close to the cap
HEAD_CHUNK = 2 * MiB   # RSS of a streamed output head (one chunk buffer)
# disk throughput (MiB/s) when no probe of this device is saved: DESIGN.md section 7, 4 threads
DEFAULT_SMALL_MIB_S = 300.0   # scattered bundle reads (a few KiB, partly coalesced)
DEFAULT_LARGE_MIB_S = 2000.0  # 1 MiB+ sequential chunks


def mib(n) -> str:
    return f"{n / MiB:.0f} MiB"


@dataclass
class PlanInput:
    cap: int | None                # bytes, None: no cap (everything resident that the mode wants)
    baseline: int                  # measured runtime RSS (Python, numpy, numba, kernels, tokenizer)
    fixed: dict                    # part -> bytes that always stay (attention, KV cache, scratch, staging)
    mode: str                      # flash | naive | dense
    selector: str                  # gate | predictor | auto (flash mode)
    gate_bytes: int                # all layers' gate rows
    pred_bytes: int                # all layers' predictors (f32 at run time)
    head_bytes: int                # output head (0 when there is none to place)
    embd_bytes: int                # untied token embedding (0 when tied to the head)
    bundle_bytes: list             # per layer: bytes of a bundle row (gate | up | down)
    gate_part: list                # per layer: bytes of its gate part (not read when gate rows are resident)
    freq: list                     # per layer: (n_ff,) f32 activation frequency of each stored row
    staging_rows: int              # rows of the FFN overflow staging buffer
    small_mib_s: float = DEFAULT_SMALL_MIB_S
    large_mib_s: float = DEFAULT_LARGE_MIB_S
    gap_bytes: int = 64 << 10      # the store reads through gaps smaller than this
    startup_peak: int = 0          # the process's RSS peak so far (loading its kernels)
    path: str = ""


@dataclass
class Plan:
    cap: int | None
    baseline: int
    resident: dict                 # part -> bytes
    capacities: list               # window slots per layer
    selector: str                  # gate | predictor | none
    head: str                      # resident | streamed
    embedding: str                 # resident | on demand (a row per token) | with the head
    staging_rows: int
    window_bytes: int = 0
    saved_ms: float = 0.0          # expected reading time the resident parts save per token
    notes: list = field(default_factory=list)
    slot_bytes: list = field(default_factory=list)   # per layer: bytes of one window slot

    @property
    def head_streamed(self) -> bool:
        return self.head == "streamed"

    @property
    def must_have(self) -> int:
        return self.baseline + sum(self.resident.values())

    def describe(self) -> str:
        cap = "no cap" if self.cap is None else f"cap {mib(self.cap)}"
        parts = ", ".join(f"{k} {mib(v)}" for k, v in self.resident.items())
        n_slots = sum(self.capacities)
        return (f"{cap} = runtime {mib(self.baseline)} + {parts} + window {mib(self.window_bytes)} "
                f"({n_slots} bundle slots); selector {self.selector}, head {self.head}, "
                f"token embedding {self.embedding}" + "".join(f"; {n}" for n in self.notes))


def _value_per_byte_slots(freq, bundle_bytes, p):
    """ms saved per token per byte for every slot of one layer, in the order slots are filled. The
    throughput of its misses goes from the small-read to the large-read figure as active rows per
    coalescing gap (mean frequency x rows in gap_bytes) goes from 0 to 1."""
    f = np.asarray(freq, np.float64)
    dense = min(1.0, float(f.mean()) * p.gap_bytes / bundle_bytes) if len(f) else 0.0
    mib_s = p.small_mib_s + (p.large_mib_s - p.small_mib_s) * dense
    return f / (mib_s * MiB) * 1e3


def make_plan(p: PlanInput) -> Plan:
    L = len(p.bundle_bytes)
    n_ff = [len(f) for f in p.freq]
    resident = dict(p.fixed)
    notes = []
    # ---- the selector ----
    selector = "none"
    if p.mode == "flash":
        selector = p.selector
        if selector == "auto":
            selector = "gate"
            # auto: exact gate rows unless they alone break the cap and the predictor is smaller
            if p.cap is not None and p.pred_bytes < p.gate_bytes and _floor(p, resident, p.gate_bytes) > p.cap:
                selector = "predictor"
                notes.append(f"predictor instead of gate rows ({mib(p.pred_bytes)} < {mib(p.gate_bytes)})")
        resident["gate rows" if selector == "gate" else "predictors"] = \
            p.gate_bytes if selector == "gate" else p.pred_bytes
    # a slot holds up|down when the gate rows are resident (a third less), else the whole bundle
    slot_bytes = [b - g for b, g in zip(p.bundle_bytes, p.gate_part)] if selector == "gate" \
        else list(p.bundle_bytes)
    # ---- what every plan holds ----
    if p.mode == "dense":
        min_caps = list(n_ff)
    else:
        resident["FFN staging"] = p.staging_rows * max(slot_bytes)
        min_caps = [1 if p.mode == "flash" else 0] * L
    min_window = sum(c * b for c, b in zip(min_caps, slot_bytes))
    head_stream = HEAD_CHUNK if p.head_bytes else 0
    floor = p.baseline + sum(resident.values()) + min_window + head_stream + HEADROOM
    if p.cap is not None and max(floor, p.startup_peak) > p.cap:
        peak = f"; the runtime peaked at {mib(p.startup_peak)} loading its kernels" \
            if p.startup_peak > floor else ""
        raise RamCapError(f"{p.path}: needs at least {mib(max(floor, p.startup_peak))} ({mib(p.baseline)} runtime + "
                          f"{mib(floor - p.baseline - min_window)} resident + {mib(min_window)} minimum window, "
                          f"head streamed{peak}), cap is {mib(p.cap)}", need=max(floor, p.startup_peak))
    # ---- the rest of the cap, by ms saved per token per byte ----
    caps = list(min_caps)
    head, embedding = "streamed", "on demand (a row per token)"
    if not p.head_bytes:
        head = "resident"
    if p.cap is None:
        room = None
    else:
        room = p.cap - floor
    items = []   # (ms saved per token per byte, kind, layer or -1, bytes)
    if p.head_bytes:
        items.append((1e3 / (p.large_mib_s * MiB), "head", -1, p.head_bytes - HEAD_CHUNK))
    if p.embd_bytes:
        items.append((1e3 / (p.small_mib_s * MiB) / max(p.embd_bytes, 1) * 4096, "embedding", -1, p.embd_bytes))
    if p.mode == "flash":
        for il in range(L):
            v = _value_per_byte_slots(p.freq[il], p.bundle_bytes[il], p)
            # slots are filled in row order (hot-first); a block of 32 slots is one item
            for j0 in range(caps[il], n_ff[il], 32):
                j1 = min(j0 + 32, n_ff[il])
                items.append((float(v[j0:j1].mean()), "slots", il, (j1 - j0) * slot_bytes[il]))
    items.sort(key=lambda it: -it[0])
    saved = 0.0
    for density, kind, il, nbytes in items:
        if room is not None and nbytes > room:
            if kind == "slots":
                k = room // slot_bytes[il]   # a partial block
                if k <= 0:
                    continue
                caps[il] += int(k)
                room -= int(k) * slot_bytes[il]
                saved += density * k * slot_bytes[il]
            continue
        if room is not None:
            room -= nbytes
        saved += density * nbytes
        if kind == "head":
            head = "resident"
        elif kind == "embedding":
            embedding = "resident"
        else:
            caps[il] += nbytes // slot_bytes[il]
    if head == "resident" and p.head_bytes:
        resident["output head"] = p.head_bytes
    elif p.head_bytes:
        resident["output head (streamed, 2 MiB chunks)"] = HEAD_CHUNK
    if embedding == "resident":
        resident["token embedding"] = p.embd_bytes
    elif not p.embd_bytes:
        embedding = "with the head" if head == "resident" else "on demand (a row per token)"
    window = sum(c * b for c, b in zip(caps, slot_bytes))
    if p.mode == "flash":
        held = sum(caps) / max(sum(n_ff), 1)
        notes.append(f"window {100 * held:.0f}% of the bundles")
    return Plan(p.cap, p.baseline, resident, caps, selector, head, embedding, p.staging_rows, window, saved,
                notes, slot_bytes)


def _floor(p: PlanInput, resident: dict, selector_bytes: int) -> int:
    """The least cap a flash plan with gate rows accepts (streamed head, one slot per layer)."""
    slot_bytes = [b - g for b, g in zip(p.bundle_bytes, p.gate_part)]
    staging = p.staging_rows * max(slot_bytes)
    return (p.baseline + sum(resident.values()) + selector_bytes + staging + sum(slot_bytes)
            + (HEAD_CHUNK if p.head_bytes else 0) + HEADROOM)
