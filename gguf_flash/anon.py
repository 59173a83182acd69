"""Private anonymous memory maps: pages resident only once written, and freed by MADV_DONTNEED.

`mmap.mmap(-1, n)` is MAP_SHARED: shared anonymous memory lives in the kernel's shmem, whose pages
MADV_DONTNEED only unmaps. RSS drops while the pages stay allocated and keep their data, so a buffer
released to meet the RAM cap went on using the RAM, out of RSS's sight (a window's released slots read
back their old rows). MAP_PRIVATE memory is the process's own: DONTNEED frees it and later reads see
zeros. Every anonymous buffer of the package comes from here.
"""

import mmap

import numpy as np

HUGE_PAGE = 2 << 20     # a transparent huge page on x86-64 and arm64 with 4 KiB pages
_PRIVATE = getattr(mmap, "MAP_PRIVATE", None)
_ANON = getattr(mmap, "MAP_ANONYMOUS", None)


def anon_map(n_bytes: int) -> mmap.mmap:
    """A page-aligned, zero-filled private anonymous map of max(n_bytes, 1) bytes, in 4 KiB pages.

    No transparent huge pages (MADV_NOHUGEPAGE): where THP is `always`, writing one row of a window or of
    a layer's KV slab would make a whole 2 MiB page resident (np.zeros did that: 58 MiB per KV cache at
    -c 4096 for 3 tokens), and RSS would outrun what the RAM plan counts. The shared maps these replace
    had 4 KiB pages too (shmem's THP setting is `never` by default). Memory written whole before use
    can have huge pages: huge_map."""
    n = max(int(n_bytes), 1)
    if _PRIVATE is None or _ANON is None:     # not POSIX: the default anonymous map
        return mmap.mmap(-1, n)
    m = mmap.mmap(-1, n, flags=_PRIVATE | _ANON)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return m


def huge_map(n_bytes: int) -> tuple[mmap.mmap, int]:
    """(map, start): a private anonymous map holding max(n_bytes, 1) bytes from `start`, a 2 MiB
    boundary, with transparent huge pages asked for (MADV_HUGEPAGE; the system's THP setting decides).

    Only for memory written whole before use: the pinned weights, and without a cap the windows
    (flash/ffn.py), whose RSS is then not planned to the page. A huge page becomes resident whole on
    its first write, so a buffer filled a row at a time under a cap would outrun the plan; anon_map is
    for those. Each 2 MiB page is one TLB entry instead of 512: inside SmolLM2's decode loop the bundle
    FFN over windows on huge pages took 7-15% less time and the head on them ~10% less (session 23,
    docs/design.md). The map is n_bytes + 2 MiB of address space; only the huge pages wholly inside the
    n bytes are asked for, so what is resident is what is written, as with anon_map."""
    n = max(int(n_bytes), 1)
    if _PRIVATE is None or _ANON is None or not hasattr(mmap, "MADV_HUGEPAGE"):
        return anon_map(n), 0
    m = mmap.mmap(-1, n + HUGE_PAGE, flags=_PRIVATE | _ANON)
    start = (-np.frombuffer(m, np.uint8, 1).ctypes.data) % HUGE_PAGE
    full = n // HUGE_PAGE * HUGE_PAGE     # the huge pages lie wholly inside the n bytes: the rest, 4 KiB
    m.madvise(mmap.MADV_NOHUGEPAGE)
    if full:
        m.madvise(mmap.MADV_HUGEPAGE, start, full)
    return m, start


def release(m: mmap.mmap, start: int, n_bytes: int) -> None:
    """Free the whole pages of m[start:start + n_bytes] (they read as zeros later); a no-op where
    madvise is missing."""
    page = mmap.PAGESIZE
    a = -(-int(start) // page) * page
    n = (int(start) + int(n_bytes) - a) // page * page
    if n > 0 and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED, a, n)
