"""Read bundle rows from the file: coalesced ranges, a thread pool, and a cold (O_DIRECT) mode.

A bundle tensor is `n_rows` fixed-size rows of `row_bytes` bytes, contiguous from byte `data_offset`
(4096-aligned in a flash GGUF): row i is at data_offset + i * row_bytes. The store knows nothing else.

Why this shape (LLM in a flash, 2.2 and 3.2): flash reads are slow when small and scattered, fast when
large or many in parallel (DESIGN.md section 7: 4 KiB reads give ~70 MiB/s on one thread, 1 MiB reads
~1900 MiB/s). So rows whose gap is below `gap_bytes` are read as one range, gap included, and ranges go
to a pool of threads calling os.preadv (which releases the GIL).

Cold mode makes benchmarks honest: with the page cache in play, a second read is a memcpy and the cache
acts as hidden DRAM. O_DIRECT needs the file offset, length and buffer address aligned (4096 here), so
each range is widened to whole 4096-byte blocks and read into an aligned staging buffer (anonymous
mmap), then rows are copied out. Where O_DIRECT is refused (tmpfs before Linux 6.6, some network and
FUSE filesystems), posix_fadvise(DONTNEED) before each read drops the cached pages instead.

Faults: a read that fails (EIO), comes up short (the file was truncated) or a file that changed on disk
raises FlashFormatError naming the file, and the fault is sticky: rows half read may already sit in a
window's slots, so the store refuses every later read and check until the model is loaded again.
"""

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..anon import anon_map
from ..errors import FlashFormatError, InvalidArgumentError

ALIGN = 4096          # O_DIRECT alignment of offset, length and buffer address
MAX_RANGE = 1 << 20   # bytes per read call: ~1 MiB reaches most of the disk's bandwidth (DESIGN.md 7)


@dataclass(slots=True)
class ReadStats:
    bytes_read: int   # bytes transferred from the file, coalesced gaps and alignment padding included
    n_reads: int      # preadv calls
    ms: float         # wall time of read_rows
    n_rows: int = 0   # rows delivered


# ---------------------------------------------------------------------------------------------------
# kernels (output first, then inputs, then sizes)
# ---------------------------------------------------------------------------------------------------

@njit(cache=True)
def _plan_ranges(r_off, r_len, r_need, r_first, r_count, r_direct, rows, dest_idx,
                 data_offset, row_bytes, stride, n_rows, n_dest, gap_bytes, max_range, align):
    """Group sorted rows into read ranges; returns the number of ranges, or -1 / -2 on bad input.

    r_off, r_len: (n,) int64 file offset and length of each range (aligned when align > 1);
    r_need: (n,) int64 bytes of the range that must be read (past it lies only alignment padding,
    which may be beyond the end of the file); r_first, r_count: (n,) int64 the range's slice of rows;
    r_direct: (n,) int8 1 if the range has no gap and lands on consecutive dest rows, so it can be
    read straight into dest. gap_bytes <= 0 disables coalescing: one range per row. Row i is the
    row_bytes at data_offset + i * stride (stride > row_bytes: a part of each row, e.g. up|down of a
    bundle whose gate part is resident).
    """
    nr = 0
    for j in range(rows.shape[0]):
        row = rows[j]
        if row < 0 or row >= n_rows or (j > 0 and row <= rows[j - 1]):
            return -1
        d = dest_idx[j]
        if d < 0 or d >= n_dest:
            return -2
        start = data_offset + row * stride
        end = start + row_bytes
        a_start = start // align * align
        a_end = (end + align - 1) // align * align
        if nr > 0 and gap_bytes > 0:
            i = nr - 1
            gap = a_start - (r_off[i] + r_len[i])  # negative when aligned blocks overlap
            if gap < gap_bytes and a_end - r_off[i] <= max_range:
                r_len[i] = a_end - r_off[i]
                r_need[i] = end - r_off[i]
                if row != rows[j - 1] + 1 or d != dest_idx[j - 1] + 1 or stride != row_bytes:
                    r_direct[i] = 0
                r_count[i] += 1
                continue
        r_off[nr] = a_start
        r_len[nr] = a_end - a_start
        r_need[nr] = end - a_start
        r_first[nr] = j
        r_count[nr] = 1
        r_direct[nr] = 1 if align == 1 and stride == row_bytes else 0
        nr += 1
    return nr


@njit(cache=True, nogil=True)
def _copy_rows(dest, staging, rows, dest_idx, first, count, range_off, data_offset, row_bytes, stride):
    """dest[dest_idx[j]] = the bytes of rows[j] inside staging, for j in first .. first+count-1.

    dest: (capacity, row_bytes) uint8; staging: (staging_bytes,) uint8 holding the file bytes from
    range_off on. nogil: the pool's threads copy in parallel with each other's reads.
    """
    for j in range(first, first + count):
        src = data_offset + rows[j] * stride - range_off
        drow = dest[dest_idx[j]]
        for b in range(row_bytes):
            drow[b] = staging[src + b]


# ---------------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------------

def _identity(st):
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _what_changed(old, new) -> str:
    """How the file differs from when it was opened (two _identity tuples)."""
    if old[:2] != new[:2]:
        return "replaced by another file"
    if new[2] < old[2]:
        return f"truncated from {old[2]} to {new[2]} bytes"
    if new[2] != old[2]:
        return f"resized from {old[2]} to {new[2]} bytes"
    return "modified (its mtime changed)"


class BundleStore:
    """Random access to the rows of one bundle tensor.

    path, data_offset, row_bytes, n_rows: where the rows are. cold: bypass the page cache.
    n_threads: parallel read calls. gap_bytes: read through gaps smaller than this (<= 0: never).
    stat: os.stat of the file when its header was parsed; the store refuses a file changed since.
    """

    def __init__(self, path, data_offset: int, row_bytes: int, n_rows: int, *, cold: bool = False,
                 n_threads: int = 4, gap_bytes: int = 64 * 1024, stat: os.stat_result | None = None,
                 max_range: int = MAX_RANGE):
        if row_bytes <= 0 or n_rows <= 0 or data_offset < 0 or n_threads < 1:
            raise InvalidArgumentError(
                f"BundleStore needs row_bytes, n_rows, n_threads > 0 and data_offset >= 0 (got "
                f"{row_bytes}, {n_rows}, {n_threads}, {data_offset})")
        self.path = os.fspath(path)
        self.data_offset, self.row_bytes, self.n_rows = int(data_offset), int(row_bytes), int(n_rows)
        self.stride = self.row_bytes
        self.n_threads, self.gap_bytes, self.cold = int(n_threads), int(gap_bytes), bool(cold)
        self.direct_io = False   # O_DIRECT in use
        self.fadvise = False     # DONTNEED before each read instead
        self.direct_refused = None if hasattr(os, "O_DIRECT") else "no O_DIRECT on this system"
        self.fault: str | None = None   # the first read fault or change on disk; later reads are refused
        self._fd = -1
        self._pool = None
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if self.cold and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct_io = True
            except OSError:
                self._fd = -1  # tmpfs (before Linux 6.6) and some others refuse O_DIRECT at open
                self.direct_refused = "O_DIRECT refused by the filesystem"
        if self._fd < 0:
            self._fd = os.open(self.path, flags)
            self.fadvise = self.cold and hasattr(os, "posix_fadvise")
        try:
            st = os.fstat(self._fd)
            if stat is not None and _identity(stat) != _identity(st):
                raise FlashFormatError(f"{self.path} changed since its header was read")
            self._identity = _identity(st)
            end = self.data_offset + self.row_bytes * self.n_rows
            if st.st_size < end:
                raise FlashFormatError(
                    f"{self.path} is truncated: bundle rows end at byte {end}, file has {st.st_size}")
            self._align = ALIGN if self.direct_io else 1
            if self.direct_io:
                self._probe_direct()
            # staging: one aligned buffer per thread; a single row widened to blocks always fits
            one_row = self.row_bytes + 2 * ALIGN
            self.max_range = max(int(max_range), one_row)
            stage_bytes = -(-self.max_range // ALIGN) * ALIGN
            self._maps = [anon_map(stage_bytes) for _ in range(self.n_threads)]
            self._staging = [np.frombuffer(m, np.uint8) for m in self._maps]  # (stage_bytes,) uint8
            self._grow_plan(256)
            if self.n_threads > 1:
                self._pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix="bundle-read")
        except BaseException:
            self.close()
            raise
        self.total = ReadStats(0, 0, 0.0, 0)  # running sums over read_rows calls

    def select(self, data_offset: int, row_bytes: int, n_rows: int, stride: int | None = None) -> None:
        """Point the store at another row tensor of the same file: row i is the `row_bytes` at
        data_offset + i * stride (stride defaults to row_bytes; a larger one reads a part of each row).
        Layers are read one after the other, so one thread pool and one set of staging buffers serve
        every layer."""
        stride = int(row_bytes if stride is None else stride)
        if row_bytes + 2 * ALIGN > self.max_range or stride < row_bytes:
            raise InvalidArgumentError(f"row of {row_bytes} bytes (stride {stride}) does not fit the staging buffers")
        self.data_offset, self.row_bytes, self.n_rows = int(data_offset), int(row_bytes), int(n_rows)
        self.stride = stride

    def _probe_direct(self):
        """Some filesystems accept O_DIRECT at open and refuse the read: fall back to fadvise."""
        buf = anon_map(ALIGN)
        try:
            os.preadv(self._fd, [buf], self.data_offset // ALIGN * ALIGN)
        except OSError:
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self.direct_io, self.fadvise, self._align = False, True, 1
            self.direct_refused = "O_DIRECT refused by the filesystem"
        finally:
            buf.close()

    def read_mode(self) -> str:
        """How rows are read, in one line (`--stats`): O_DIRECT, or fadvise where O_DIRECT was refused."""
        if self.direct_io:
            return "cold reads: O_DIRECT"
        if self.fadvise:
            return f"cold reads: posix_fadvise(DONTNEED) ({self.direct_refused})"
        if self.cold:
            return (f"cold reads: unavailable ({self.direct_refused}, no posix_fadvise): "
                    f"repeated reads come from the page cache")
        return "reads: through the page cache (--cold bypasses it)"

    def _grow_plan(self, n):
        """Range arrays for up to n rows; grown (rarely) when a call asks for more rows."""
        self._r_off = np.empty(n, np.int64)     # (n,) int64
        self._r_len = np.empty(n, np.int64)     # (n,) int64
        self._r_need = np.empty(n, np.int64)    # (n,) int64
        self._r_first = np.empty(n, np.int64)   # (n,) int64
        self._r_count = np.empty(n, np.int64)   # (n,) int64
        self._r_direct = np.empty(n, np.int8)   # (n,) int8

    # -- reading ------------------------------------------------------------------------------------

    def read_rows(self, rows: np.ndarray, dest: np.ndarray, dest_idx: np.ndarray,
                  gap_bytes: int | None = None) -> ReadStats:
        """dest[dest_idx[j]] = row rows[j] of the file, for every j.

        rows: (n,) int32 strictly increasing row ids; dest: (capacity, row_bytes) uint8 C-contiguous
        (e.g. Window.slots); dest_idx: (n,) int32 the dest row of each row. gap_bytes: this call's
        read-through gap instead of the store's (the head index's scattered rows want a smaller one).
        """
        if self.fault is not None:
            raise self._refused()
        t0 = time.perf_counter()
        rows = np.ascontiguousarray(rows, dtype=np.int32)
        dest_idx = np.ascontiguousarray(dest_idx, dtype=np.int32)
        if (dest.dtype != np.uint8 or dest.ndim != 2 or dest.shape[1] != self.row_bytes
                or not dest.flags.c_contiguous or not dest.flags.writeable):
            raise InvalidArgumentError(
                f"dest must be a writable C-contiguous (capacity, {self.row_bytes}) uint8 array")
        if rows.shape != dest_idx.shape or rows.ndim != 1:
            raise InvalidArgumentError("rows and dest_idx must be 1-d arrays of the same length")
        n = rows.shape[0]
        if n == 0:
            return ReadStats(0, 0, 0.0, 0)
        if self._fd < 0:
            raise InvalidArgumentError("read_rows on a closed BundleStore")
        if n > self._r_off.shape[0]:
            self._grow_plan(max(n, 2 * self._r_off.shape[0]))
        nr = _plan_ranges(self._r_off, self._r_len, self._r_need, self._r_first, self._r_count,
                          self._r_direct, rows, dest_idx, self.data_offset, self.row_bytes, self.stride,
                          self.n_rows, dest.shape[0], self.gap_bytes if gap_bytes is None else int(gap_bytes),
                          self.max_range, self._align)
        if nr == -1:
            raise InvalidArgumentError(
                f"rows must be strictly increasing and inside [0, {self.n_rows})")
        if nr == -2:
            raise InvalidArgumentError(f"dest_idx must be inside [0, {dest.shape[0]})")
        counter = itertools.count()
        if self._pool is None or nr == 1:
            n_bytes, n_calls = self._work(0, counter, nr, rows, dest, dest_idx)
        else:
            futs = [self._pool.submit(self._work, w, counter, nr, rows, dest, dest_idx)
                    for w in range(min(self.n_threads, nr))]
            wait(futs)   # on a fault, every thread has stopped writing into dest before it is raised
            n_bytes = n_calls = 0
            for f in futs:
                b, c = f.result()
                n_bytes += b
                n_calls += c
        stats = ReadStats(n_bytes, n_calls, (time.perf_counter() - t0) * 1e3, n)
        tot = self.total
        tot.bytes_read += n_bytes
        tot.n_reads += n_calls
        tot.ms += stats.ms
        tot.n_rows += n
        return stats

    def _work(self, w, counter, nr, rows, dest, dest_idx):
        """One pool thread: take ranges from the shared counter until none are left."""
        staging = self._staging[w]
        fd = self._fd
        n_bytes = n_calls = 0
        while True:
            i = next(counter)  # atomic under the GIL: dynamic load balancing across threads
            if i >= nr or self.fault is not None:   # done, or another thread failed
                return n_bytes, n_calls
            off, length, need = int(self._r_off[i]), int(self._r_len[i]), int(self._r_need[i])
            first, count = int(self._r_first[i]), int(self._r_count[i])
            if self._r_direct[i]:
                d0 = int(dest_idx[first])
                buf = dest[d0:d0 + count].reshape(-1)  # contiguous dest rows: no staging, no copy
            else:
                buf = staging[:length]
            try:
                if self.fadvise:
                    os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
                got, calls = self._read_full(fd, buf, off, need)
            except OSError as e:   # EIO, a vanished network file, ...
                raise self._fail(f"read error at byte {off}: {e.strerror or e}") from e
            n_bytes += got
            n_calls += calls
            if not self._r_direct[i]:
                _copy_rows(dest, staging, rows, dest_idx, first, count, off, self.data_offset,
                           self.row_bytes, self.stride)

    def _read_full(self, fd, buf, off, need):
        """preadv until `need` bytes are in buf (short reads happen at EOF and on signals). Nothing past
        the end of the file is ever taken as data: reading 0 bytes before `need` is a fault."""
        got = calls = 0
        mv = memoryview(buf)
        while got < need:
            k = os.preadv(fd, [mv[got:]], off + got)
            calls += 1
            if k <= 0:
                try:
                    size = f"the file has {os.fstat(fd).st_size} bytes now"
                except OSError:
                    size = "the file's size is unknown"
                raise self._fail(f"short read: bytes {off}..{off + need} were needed, the file ended at byte "
                                 f"{off + got} ({size}; truncated while running?)")
            got += k
        return got, calls

    def _fail(self, problem: str) -> FlashFormatError:
        """Record the first fault (the store refuses to read after it) and return the error to raise."""
        if self.fault is None:
            self.fault = problem
        return FlashFormatError(f"{self.path}: {problem}")

    def _refused(self) -> FlashFormatError:
        return FlashFormatError(f"{self.path}: not read after an earlier fault ({self.fault}); load the model "
                                f"again")

    # -- lifetime -----------------------------------------------------------------------------------

    def check_unchanged(self) -> None:
        """Raise FlashFormatError if the file at `path` was replaced, resized or modified since open, or
        an earlier read failed. The runtime calls it before each token and prompt chunk and after each
        token and prompt, so logits computed while the file changed are never sampled."""
        if self.fault is not None:
            raise self._refused()
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise self._fail(f"gone since it was opened ({e.strerror or e})") from e
        if _identity(st) != self._identity:
            raise self._fail(f"changed on disk since it was opened: {_what_changed(self._identity, _identity(st))}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._staging = []
        for m in getattr(self, "_maps", []):
            try:
                m.close()
            except BufferError:
                pass  # a caller still holds a view; the map goes with the last reference
        self._maps = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
