"""The flash runtime's sizes, before anything large is loaded: how the store reads this device
(DiskSettings, from `gguf-flash bench-io`'s probe), and the RAM plan from the runtime's measured RSS and
the file's parts (choose_plan: plan.make_plan for prompt chunks of CHUNK and 2 x CHUNK tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError, RamCapError
from . import budget, diskprobe
from .head import HeadOrder
from .head_index import index_ram
from .plan import PlanInput, make_plan
from .prefill import CHUNK
from .prefill import buffer_bytes as prefill_bytes, gate_bytes as prefill_gate_bytes

STAGING_BYTES = 4 << 20   # FFN overflow staging: rows per chunk (a whole SmolLM2 layer; 4 parallel 1 MiB reads)
STAGING_MAX_BYTES = 32 << 20   # what it grows to where the cap has room (plan.PlanInput.staging_rows_max):
                               # 7B shape at 2 GiB, 1.35x faster per token than 4 MiB (README)


def peak_rss() -> int:
    """This process image's RSS peak so far (bytes): loading the kernels touches LLVM before it is
    released. /proc's VmHWM starts afresh at exec; getrusage's ru_maxrss does not (a child of a big
    process inherits its parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return budget.rss()


@dataclass
class DiskSettings:
    """How the store reads this device: the read-through gap and read threads (from `gguf-flash
    bench-io`'s probe when there is one, else 64 KiB and the caller's threads), the probe's MiB/s at
    16 KiB and 1 MiB (None: not probed, the plan's defaults), and the largest single read."""
    gap: int
    io_threads: int
    small: float | None
    large: float | None
    max_range: int


def disk_settings(f, info, io_threads: int) -> DiskSettings:
    bb = [l.bundle_bytes for l in info.layers]
    max_range = max(1 << 20, 2 * max(bb))
    gap, small, large = 64 << 10, None, None
    probed = diskprobe.load(f.path)
    if probed:  # `gguf-flash bench-io` measured this device
        gap, io_threads = diskprobe.recommend(probed)
        io_threads = min(io_threads, 8)
        small, large = _throughput(probed, 16 << 10), _throughput(probed, 1 << 20)
    return DiskSettings(gap, io_threads, small, large, max_range)


def keep_frequencies(freq, keep: int) -> np.ndarray:
    """(n_ff,) f32: how often the top-k rule (keep rows a token) chooses each row, estimated from the
    threshold rule's calibration frequencies scaled to the rule's mean keep / n_ff (the file stores no
    frequencies of its own for it); keep 0: the threshold's."""
    f = np.asarray(freq, np.float64)
    if keep <= 0 or f.mean() <= 0:
        return np.asarray(freq, np.float32)
    return np.minimum(1.0, f * (keep / len(f)) / f.mean()).astype(np.float32)


def choose_plan(f, c, info, w, st, cap, baseline: int, mode: str, selector: str, head: str,
                disk: DiskSettings, logit_rows: int, n_ctx: int, prefill_chunk: int | None):
    """(the RAM plan, the prompt chunk's tokens) from the runtime's measured RSS (baseline), the file's
    parts and the disk; plan.make_plan raises RamCapError for an impossible cap."""
    L = c.n_layer
    attn = int(sum(w.mats[il, j, 1] * w.mats[il, j, 2] for il in range(L) for j in range(4)))
    kv = st.k_cache.nbytes + st.v_cache.nbytes
    scratch = sum(a.nbytes for a in vars(st).values() if isinstance(a, np.ndarray)) - kv
    fixed = {"attention": attn, "KV cache": kv, "scratch": scratch, "I/O staging": disk.io_threads * disk.max_range}
    if logit_rows > 1:
        fixed["prompt logits"] = logit_rows * c.n_vocab * 4
    tables = sum(l.table_bytes for l in info.layers)   # column down parts' scales (FFNLoader copies them)
    if tables:
        fixed["down tables"] = tables
    hi = info.head_index
    if info.head_order is not None:   # the head's stored row order (flash/head.py)
        fixed["head order"] = HeadOrder.ram(c.n_vocab)
    head_bytes = int(w.output[1] * w.output[2])
    embd_bytes = 0 if c.tied_output else int(w.embd[1] * w.embd[2])
    bb = [l.bundle_bytes for l in info.layers]
    slot_max = max(bb)
    inp = PlanInput(
        cap=cap, baseline=baseline, fixed=fixed, mode=mode,
        selector=selector if mode == "flash" else "none",
        gate_bytes=sum(c.n_ff * l.part_bytes[0] for l in info.layers) + prefill_gate_bytes(c, 2 * CHUNK),
        up_bytes=sum(c.n_ff * l.part_bytes[1] for l in info.layers) + prefill_gate_bytes(c, 2 * CHUNK)
        if info.has_product else 0,
        prod_freq=[l.prod_freq for l in info.layers] if info.has_product else None,
        pred_bytes=sum(l.pred_bytes for l in info.layers) if info.has_predictors else 0,
        head_bytes=head_bytes, embd_bytes=embd_bytes,
        bundle_bytes=bb, gate_part=[l.part_bytes[0] for l in info.layers],
        up_part=[l.part_bytes[1] for l in info.layers],
        freq=[l.freq for l in info.layers], precision=[l.precision for l in info.layers],
        keep_freq=[keep_frequencies(l.freq, l.keep) for l in info.layers] if any(l.keep for l in info.layers)
        else None,
        prod_keep_freq=[keep_frequencies(l.prod_freq, l.prod_keep) for l in info.layers]
        if info.has_product and any(l.prod_keep for l in info.layers) else None,
        staging_rows=c.n_ff if mode == "naive" else max(2, min(c.n_ff, STAGING_BYTES // slot_max)),
        staging_rows_max=max(2, min(c.n_ff, STAGING_MAX_BYTES // slot_max)),
        gap_bytes=disk.gap, startup_peak=peak_rss() if cap is not None else 0, path=str(f.path))
    if head == "index" and (hi is None or mode != "flash"):
        why = ("its head index is an older converter's (a per-row bound that read most of the head); "
               "convert the source again" if info.old_head_index else "convert without --no-head-index")
        raise InvalidArgumentError(f"{f.path}: --head index needs flash mode and a file with a head index "
                                   f"({why})")
    if hi is not None and head != "exact" and mode == "flash":
        inp.index_bytes = index_ram(c.n_vocab, c.n_embd, hi["rank"])
        inp.index_frac = hi["bytes_frac"]
        inp.head_choice = head
    if disk.small:
        inp.small_mib_s, inp.large_mib_s = disk.small, disk.large
    # prompt chunks of 2 x CHUNK tokens (half the reads per prompt token) where their buffers cost
    # decoding at most 5% more expected reading than CHUNK's; else CHUNK (the floor is CHUNK's)
    plans = {}
    for chunk in ([prefill_chunk] if prefill_chunk else [CHUNK, 2 * CHUNK]):
        fixed["prompt chunk"] = prefill_bytes(c, n_ctx, chunk)
        try:
            plans[chunk] = make_plan(inp)
        except RamCapError:
            if chunk == (prefill_chunk or CHUNK):
                raise
    chunk = max(k for k, q in plans.items() if q.read_ms <= 1.05 * min(p.read_ms for p in plans.values()))
    return plans[chunk], chunk


def _throughput(rows, size) -> float:
    """Best probed MiB/s at the read size nearest `size`."""
    sizes = sorted({r.size for r in rows}, key=lambda s: abs(np.log2(s) - np.log2(size)))
    return max(r.mib_s for r in rows if r.size == sizes[0])
