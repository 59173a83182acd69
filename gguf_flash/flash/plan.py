"""The RAM plan: what stays resident under a cap, chosen by the bytes of reading it saves per token.

A pure function of sizes, calibration frequencies and the disk's throughput (LLM in a flash, section 2:
the cost of a byte is the time to read it at the size it is read). Nothing here touches the model.

Must stay resident (else refuse the cap, with the numbers): the runtime (measured), attention weights,
norms, KV cache, scratch, I/O staging, one selector (exact gate rows, or the predictor where the gate
rows do not fit and it is smaller; or gate and up rows, the product selector, where the file has its
criterion), the FFN overflow staging (grown from its floor size to staging_rows_max where that takes
at most 1/8 of the room over the floor: long read rounds; active neurons that are not in the window
are read there in chunks and computed: the window is a cache, never a requirement) and one window slot
per layer. Everything else competes for the rest of the cap by milliseconds of reading saved per token
per byte of RAM:
- the output head: resident saves reading it whole every token, in large sequential reads;
- window slot j of layer l: holds neuron j (rows are stored hot-first) and saves reading its bundle
  with probability freq_l[j] at the small-read throughput when misses are scattered; when the layer's
  active rows are dense enough that coalescing (reading through gaps under gap_bytes) makes long
  reads, it saves its whole bundle span every token at the large-read throughput;
- the head index (flash/head_index.py), when the file has one: saves reading the head's rows that its
  preview rules out (what it still reads: the share of the head's bytes it read on held-out states at
  conversion, rows closer than 64 KiB read through, priced between the small- and large-read throughputs,
  at their geometric mean); a resident head makes it useless, so a plan never holds both;
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
    pred_bytes: int                # all layers' predictors as resident (A, B float16, bias f32);
                                   # 0: the file has no predictor for some layer, never a candidate
    head_bytes: int                # output head (0 when there is none to place)
    embd_bytes: int                # untied token embedding (0 when tied to the head)
    bundle_bytes: list             # per layer: bytes of a bundle row (gate | up | down)
    gate_part: list                # per layer: bytes of its gate part (not read when gate rows are resident)
    freq: list                     # per layer: (n_ff,) f32 activation frequency of each stored row
    staging_rows: int              # rows of the FFN overflow staging buffer (at the floor)
    staging_rows_max: int = 0      # rows it grows to where that costs at most 1/8 of the room over the
                                   # floor (fewer, longer read rounds: a 7B layer is ~100 MiB of bundles)
    small_mib_s: float = DEFAULT_SMALL_MIB_S
    large_mib_s: float = DEFAULT_LARGE_MIB_S
    precision: list | None = None  # per layer: the predictor's held-out precision (it reads freq/precision)
    gap_bytes: int = 64 << 10      # the store reads through gaps smaller than this
    startup_peak: int = 0          # the process's RSS peak so far (loading its kernels)
    path: str = ""
    index_bytes: int = 0           # RAM of the head index (0: the file has none, or --head exact)
    index_frac: float = 1.0        # the share of head bytes it reads per token (held-out, at conversion)
    head_choice: str = "auto"      # auto: the plan places head / index; index: the index always, the head
                                   # streamed (needs index_bytes); exact: never the index
    up_bytes: int = 0              # all layers' up rows (+ a prompt chunk's up values); 0: no product selector
    up_part: list | None = None    # per layer: bytes of its up part
    prod_freq: list | None = None  # per layer: (n_ff,) f32 how often the product criterion chooses each row
    keep_freq: list | None = None  # per layer: (n_ff,) f32 the gate rows' top-k rule's frequencies (the
                                   # threshold's scaled to its mean keep / n_ff); None: no top-k rule
    prod_keep_freq: list | None = None  # the same for the product's top-k rule (from prod_freq)


@dataclass
class Plan:
    cap: int | None
    baseline: int
    resident: dict                 # part -> bytes
    capacities: list               # window slots per layer
    selector: str                  # gate | product | predictor | bundle (gate values from the bundles read) | none
    head: str                      # resident | indexed (streamed rows the index asks for) | streamed
    embedding: str                 # resident | on demand (a row per token) | with the head
    staging_rows: int
    window_bytes: int = 0
    saved_ms: float = 0.0          # expected reading time the resident parts save per token
    notes: list = field(default_factory=list)
    slot_bytes: list = field(default_factory=list)   # per layer: bytes of one window slot
    read_ms: float = 0.0           # expected reading per token that the plan leaves (the cost model's)

    @property
    def head_streamed(self) -> bool:
        return self.head != "resident"

    @property
    def head_indexed(self) -> bool:
        return self.head == "indexed"

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


def _value_per_byte_slots(freq, bundle_bytes, slot_bytes, p):
    """ms saved per token per byte for every slot of one layer, in the order slots are filled. Scattered
    misses cost their own bytes (freq x slot bytes) at the small-read throughput; when the layer's active
    rows are dense enough that coalescing reads through the gaps (mean frequency x rows per gap_bytes
    reaches 1), every row in the span costs its whole bundle, active or not, at the large-read
    throughput. In between, both mix in proportion."""
    f = np.asarray(freq, np.float64)
    dense = min(1.0, float(f.mean()) * p.gap_bytes / bundle_bytes) if len(f) else 0.0
    mib_s = p.small_mib_s + (p.large_mib_s - p.small_mib_s) * dense
    per_row = dense * bundle_bytes + (1.0 - dense) * f * slot_bytes     # bytes read per token
    return per_row / slot_bytes / (mib_s * MiB) * 1e3


def make_plan(p: PlanInput) -> Plan:
    """The plan for p.selector; with "auto" (flash mode), the candidate that reads the fewest expected
    milliseconds per token among those the cap accepts: exact gate rows; gate and up rows with the
    product criterion (its own sparsity, within the same held-out perplexity budget: it reads only the
    down part of the rows it chooses) where the file has it; or no resident selector at all
    ("bundle": gate values computed from the bundles read, same neurons, same thresholds) where the
    layers' active rows are so dense that their reads coalesce into whole layers anyway and the gate
    rows' RAM buys more as window or head; the predictor (it misses neurons) only where the gate rows
    do not fit, when the file has one for every layer (pred_bytes > 0)."""
    if p.mode != "flash" or p.selector != "auto":
        return _plan(p, p.selector if p.mode == "flash" else "none")
    plans, refused = [], None
    for sel in ("gate", "bundle") + (("product",) if p.up_bytes and p.prod_freq is not None else ()):
        try:
            plans.append(_plan(p, sel))
        except RamCapError as e:
            refused = refused if refused is not None and refused.need <= e.need else e
    if not any(q.selector == "gate" for q in plans) and 0 < p.pred_bytes < p.gate_bytes:
        try:
            plans.append(_plan(p, "predictor"))
        except RamCapError as e:
            refused = refused if refused is not None and refused.need <= e.need else e
    if not plans:
        raise refused
    best = min(plans, key=lambda q: q.read_ms - (0.01 if q.selector == "gate" else 0.0))
    others = [q for q in plans if q is not best]
    if others:
        best.notes.insert(0, f"selector {best.selector}: {best.read_ms:.1f} ms of reading per token expected, "
                             f"{others[0].selector} {others[0].read_ms:.1f}")
    return best


def _plan(p: PlanInput, selector: str) -> Plan:
    L = len(p.bundle_bytes)
    n_ff = [len(f) for f in p.freq]
    resident = dict(p.fixed)
    notes = []
    freq = p.freq
    if selector == "gate":
        resident["gate rows"] = p.gate_bytes
        if p.keep_freq is not None:
            freq = p.keep_freq
    elif selector == "product":
        resident["gate and up rows"] = p.gate_bytes + p.up_bytes
        freq = p.prod_freq if p.prod_keep_freq is None else p.prod_keep_freq
    elif selector == "predictor":
        resident["predictors"] = p.pred_bytes
        if p.precision is not None:   # it chooses freq / precision of the rows, not freq
            freq = [np.minimum(1.0, np.asarray(f, np.float64) / max(float(pr), 1e-3)).astype(np.float32)
                    for f, pr in zip(p.freq, p.precision)]
    elif selector == "bundle":   # every row is read or held each token; its gate decides in the kernel
        freq = [np.ones(n, np.float32) for n in n_ff]
    forced_index = bool(p.head_choice == "index" and p.index_bytes and p.head_bytes)
    if forced_index:
        resident["head index"] = p.index_bytes
    # a slot holds up|down when the gate rows are resident (a third less), down with the product
    # selector, else the whole bundle
    if selector == "gate":
        slot_bytes = [b - g for b, g in zip(p.bundle_bytes, p.gate_part)]
    elif selector == "product":
        slot_bytes = [b - g - u for b, g, u in zip(p.bundle_bytes, p.gate_part, p.up_part)]
    else:
        slot_bytes = list(p.bundle_bytes)
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
    staging_rows = p.staging_rows
    if p.mode == "flash" and p.staging_rows_max > p.staging_rows:
        extra = (p.staging_rows_max - p.staging_rows) * max(slot_bytes)
        if room is None or 8 * extra <= room:
            staging_rows = p.staging_rows_max
            resident["FFN staging"] = staging_rows * max(slot_bytes)
            room = None if room is None else room - extra
    items = []   # (ms saved per token per byte, kind, layer or -1, bytes)
    if forced_index:
        head = "indexed"
    elif p.head_bytes:
        items.append((1e3 / (p.large_mib_s * MiB), "head", -1, p.head_bytes - HEAD_CHUNK))
        if p.index_bytes and p.head_choice == "auto":
            mid = (p.small_mib_s * p.large_mib_s) ** 0.5
            saved_ms = p.head_bytes / (p.large_mib_s * MiB) * 1e3 - p.index_frac * p.head_bytes / (mid * MiB) * 1e3
            if saved_ms > 0:
                items.append((saved_ms / p.index_bytes, "head index", -1, p.index_bytes))
    if p.embd_bytes:
        items.append((1e3 / (p.small_mib_s * MiB) / max(p.embd_bytes, 1) * 4096, "embedding", -1, p.embd_bytes))
    if p.mode == "flash":
        for il in range(L):
            v = _value_per_byte_slots(freq[il], p.bundle_bytes[il], slot_bytes[il], p)
            # slots are filled in row order (hot-first); a block of 32 slots is one item
            for j0 in range(caps[il], n_ff[il], 32):
                j1 = min(j0 + 32, n_ff[il])
                items.append((float(v[j0:j1].mean()), "slots", il, (j1 - j0) * slot_bytes[il]))
    items.sort(key=lambda it: -it[0])
    # what reading costs with nothing resident: the index's item is a saving on the head's, not a cost
    total_ms = sum(d * b for d, kind, _, b in items if kind != "head index")
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
            if head == "indexed":   # the index is of no use beside a resident head: its bytes go back
                room = None if room is None else room + p.index_bytes
                saved -= [d * b for d, k, _, b in items if k == "head index"][0]
            head = "resident"
        elif kind == "head index":
            if head == "resident":
                room = None if room is None else room + nbytes
                saved -= density * nbytes
                continue
            head = "indexed"
        elif kind == "embedding":
            embedding = "resident"
        else:
            caps[il] += nbytes // slot_bytes[il]
    if head == "resident" and p.head_bytes:
        resident["output head"] = p.head_bytes
    elif p.head_bytes:
        resident["output head (streamed, 2 MiB chunks)"] = HEAD_CHUNK
        if head == "indexed" and not forced_index:
            resident["head index"] = p.index_bytes
    if embedding == "resident":
        resident["token embedding"] = p.embd_bytes
    elif not p.embd_bytes:
        embedding = "with the head" if head == "resident" else "on demand (a row per token)"
    window = sum(c * b for c, b in zip(caps, slot_bytes))
    if p.mode == "flash":
        held = sum(caps) / max(sum(n_ff), 1)
        notes.append(f"window {100 * held:.0f}% of the bundles")
    return Plan(p.cap, p.baseline, resident, caps, selector, head, embedding, staging_rows, window, saved,
                notes, slot_bytes, max(0.0, total_ms - saved))
