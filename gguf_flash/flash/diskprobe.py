"""Measure the disk: O_DIRECT random reads by read size and thread count (DESIGN.md section 7).

LLM in a flash, 2.2: flash throughput grows with read size and with parallel requests, and small
random reads waste most of it. The store (flash/store.py) needs two numbers from this curve: how large
a gap between wanted rows is worth reading through (`gap_bytes`) and how many reads to keep in flight
(`n_threads`). `probe` measures the curve, `recommend` turns it into those numbers, and save/load keep
the result per device in the cache so it is measured once.
"""

import json
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..anon import anon_map
from ..errors import InvalidArgumentError

KiB = 1024
MiB = 1024 * KiB
ALIGN = 4096
DEFAULT_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
DEFAULT_THREADS = (1, 4, 16)


class ProbeRow(NamedTuple):
    size: int       # bytes per read
    threads: int    # reads in flight
    mib_s: float    # MiB/s over all threads


def cache_dir() -> Path:
    """gguf-flash's cache root: $GGUF_FLASH_CACHE or ~/.cache/gguf-flash (shared helper pending)."""
    env = os.environ.get("GGUF_FLASH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gguf-flash"


# ---------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------

def _open_cold(path):
    """(fd, uses_o_direct): O_DIRECT where the filesystem allows it, else plain + fadvise per read."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


def _write_scratch(path, n_bytes, seed):
    """n_bytes of random data (incompressible, so no layer below can cheat), fsynced."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            chunk = min(left, 4 * MiB)
            f.write(rng.bytes(chunk))
            left -= chunk
        f.flush()
        os.fsync(f.fileno())


def _measure(fd, direct, file_bytes, size, n_threads, seconds, rng):
    """MiB/s of random reads of `size` bytes with n_threads threads for about `seconds`."""
    n_pos = (file_bytes - size) // ALIGN + 1
    offsets = [rng.integers(0, n_pos, 4096, dtype=np.int64) * ALIGN for _ in range(n_threads)]
    bufs = [anon_map(-(-size // ALIGN) * ALIGN) for _ in range(n_threads)]  # page-aligned
    done = [0] * n_threads
    start = threading.Barrier(n_threads + 1)
    deadline = [0.0]

    def run(w):
        buf, offs = memoryview(bufs[w])[:size], offsets[w].tolist()
        start.wait()
        end, i, n = deadline[0], 0, 0
        while True:
            off = offs[i % len(offs)]
            if not direct:
                os.posix_fadvise(fd, off, size, os.POSIX_FADV_DONTNEED)
            n += os.preadv(fd, [buf], off)
            i += 1
            if (i & 3) == 0 and time.perf_counter() >= end:
                break
        done[w] = n
        buf.release()

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(n_threads)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for b in bufs:
        b.close()
    return sum(done) / elapsed / MiB


def probe(path=None, sizes=DEFAULT_SIZES, threads=DEFAULT_THREADS, seconds: float = 0.5, *,
          file_bytes: int = 256 * MiB, seed: int = 0) -> list[ProbeRow]:
    """Random-offset cold reads for every (size, threads) pair, `seconds` each.

    path: an existing file to read (left untouched), or a directory (None: the cache dir) in which a
    scratch file of file_bytes is written and deleted afterwards. The file should be much larger than
    the disk's own cache for honest numbers (256 MiB default); a few MiB make a quick smoke probe.
    """
    sizes, threads = sorted(int(s) for s in sizes), sorted(int(t) for t in threads)
    if not sizes or not threads or sizes[0] < ALIGN or any(s % ALIGN for s in sizes) or threads[0] < 1:
        raise InvalidArgumentError("probe sizes must be multiples of 4096 and threads >= 1")
    path = Path(path) if path is not None else cache_dir()
    scratch = None
    if path.is_dir() or not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        scratch = path / f".diskprobe-{os.getpid()}.tmp"
        _write_scratch(scratch, max(int(file_bytes), sizes[-1]), seed)
        target = scratch
    else:
        target = path
    try:
        n_bytes = os.path.getsize(target)
        if n_bytes < sizes[-1]:
            raise InvalidArgumentError(f"{target} is smaller than the largest probe read")
        fd, direct = _open_cold(target)
        try:
            rng = np.random.default_rng(seed)
            return [ProbeRow(s, t, round(_measure(fd, direct, n_bytes, s, t, seconds, rng), 1))
                    for s in sizes for t in threads]
        finally:
            os.close(fd)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# advice for the store
# ---------------------------------------------------------------------------------------------------

def recommend(results) -> tuple[int, int]:
    """(gap_bytes, n_threads) for BundleStore from probe rows.

    n_threads: the best thread count for 64 KiB reads (or the measured size nearest to it).
    gap_bytes: where reading more stops costing time. Two small reads cost about 2 * t_op, one read
    spanning both plus a gap g costs about t_op + g / bandwidth, so the gap is worth reading while
    g < t_op * bandwidth: the disk's bandwidth-delay product, the read size near which throughput
    stops growing much. t_op is the aggregate time per smallest read at n_threads, bandwidth the best
    throughput at n_threads; rounded to 4 KiB and kept within 4 KiB .. 1 MiB.
    """
    rows = [ProbeRow(*r) for r in results]
    if not rows:
        raise InvalidArgumentError("recommend needs probe results")
    sizes = sorted({r.size for r in rows})
    near = min(sizes, key=lambda s: (abs(np.log2(s / (64 * KiB))), s))
    at = [r for r in rows if r.size == near]
    n_threads = max(at, key=lambda r: (r.mib_s, -r.threads)).threads
    mine = sorted((r for r in rows if r.threads == n_threads), key=lambda r: r.size)
    smallest, best = mine[0], max(r.mib_s for r in mine)
    if smallest.mib_s <= 0:
        return 64 * KiB, n_threads
    t_op = smallest.size / (smallest.mib_s * MiB)
    gap = int(round(t_op * best * MiB / ALIGN)) * ALIGN
    return min(max(gap, ALIGN), MiB), n_threads


# ---------------------------------------------------------------------------------------------------
# per-device cache
# ---------------------------------------------------------------------------------------------------

def _cache_file() -> Path:
    return cache_dir() / "diskprobe.json"


def save(results, where) -> Path:
    """Remember the probe of the device holding `where` (a file or directory); returns the json path."""
    dev = str(os.stat(where).st_dev)
    f = _cache_file()
    try:
        table = json.loads(f.read_text())
    except (OSError, ValueError):
        table = {}
    table[dev] = {"where": os.fspath(where), "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "rows": [list(ProbeRow(*r)) for r in results]}
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, f)  # atomic: a concurrent reader sees the old or the new table, never half
    return f


def load(where) -> list[ProbeRow] | None:
    """The saved probe of the device holding `where`, or None if it was never measured."""
    try:
        table = json.loads(_cache_file().read_text())
        entry = table[str(os.stat(where).st_dev)]
        return [ProbeRow(int(s), int(t), float(m)) for s, t, m in entry["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
