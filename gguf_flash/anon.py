"""Private anonymous memory maps: pages resident only once written, and freed by MADV_DONTNEED.

`mmap.mmap(-1, n)` is MAP_SHARED: shared anonymous memory lives in the kernel's shmem, whose pages
MADV_DONTNEED only unmaps. RSS drops while the pages stay allocated and keep their data, so a buffer
released to meet the RAM cap went on using the RAM, out of RSS's sight (a window's released slots read
back their old rows). MAP_PRIVATE memory is the process's own: DONTNEED frees it and later reads see
zeros. Every anonymous buffer of the package comes from here.
"""

import mmap

_PRIVATE = getattr(mmap, "MAP_PRIVATE", None)
_ANON = getattr(mmap, "MAP_ANONYMOUS", None)


def anon_map(n_bytes: int) -> mmap.mmap:
    """A page-aligned, zero-filled private anonymous map of max(n_bytes, 1) bytes, in 4 KiB pages.

    No transparent huge pages (MADV_NOHUGEPAGE): where THP is `always`, writing one row of a window or of
    a layer's KV slab would make a whole 2 MiB page resident (np.zeros did that: 58 MiB per KV cache at
    -c 4096 for 3 tokens), and RSS would outrun what the RAM plan counts. The shared maps these replace
    had 4 KiB pages too (shmem's THP setting is `never` by default). Huge pages did not speed up the
    flash step either (docs/design.md, "Released memory is freed, not hidden")."""
    n = max(int(n_bytes), 1)
    if _PRIVATE is None or _ANON is None:     # not POSIX: the default anonymous map
        return mmap.mmap(-1, n)
    m = mmap.mmap(-1, n, flags=_PRIVATE | _ANON)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return m


def release(m: mmap.mmap, start: int, n_bytes: int) -> None:
    """Free the whole pages of m[start:start + n_bytes] (they read as zeros later); a no-op where
    madvise is missing."""
    page = mmap.PAGESIZE
    a = -(-int(start) // page) * page
    n = (int(start) + int(n_bytes) - a) // page * page
    if n > 0 and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED, a, n)
