"""The resident weights of a flash model copied out of the file map into anonymous memory.

The kernels address weights as (offset, rows, row bytes, type) into one byte array, the memory-mapped
file. A flash file can be truncated while a model runs (a copy over it, a full disk); a mapped page past
the new end then raises SIGBUS on the next token, which kills the process. So the weights the runtime
keeps (attention, a resident head or embedding) are copied, piece by piece with each piece's file pages
released right away (RSS grows by one piece at most), into an anonymous buffer, and their descriptors
point there; everything else is read through the bundle store, whose faults are errors naming the file.
RSS in steady state is unchanged: those pages were touched every token anyway.
"""

from __future__ import annotations

import numpy as np

from ..anon import huge_map

PIECE = 4 << 20      # bytes copied between releases of the file's pages
ALIGN = 64           # every region starts 64-byte aligned, as in the GGUF file


def pin(f, descs) -> np.ndarray:
    """Copy the weights described by `descs` (a list of (offset, n_rows, row_bytes, type) int64 arrays,
    rewritten in place to point into the copy; several descriptors of one tensor share it) into an
    anonymous buffer. Returns that buffer as a read-only flat uint8 view (the file map's array type)."""
    src = f._mm
    unique = list({id(d): d for d in descs}.values())  # a tied head and embedding may be one array
    origin = [int(d[0]) for d in unique]
    regions: dict[int, int] = {}                       # file offset -> offset in the copy
    total = 0
    for d, off in zip(unique, origin):
        if off not in regions:
            regions[off] = total
            total += -(-int(d[1] * d[2]) // ALIGN) * ALIGN
    mm, start = huge_map(total)                        # written whole here: huge pages cost no RSS
    buf = np.frombuffer(mm, np.uint8, max(total, 1), offset=start)
    done: set[int] = set()
    for d, off in zip(unique, origin):
        n = int(d[1] * d[2])
        if off not in done:
            dst = regions[off]
            for p in range(0, n, PIECE):
                k = min(PIECE, n - p)
                buf[dst + p:dst + p + k] = src[off + p:off + p + k]
                f.release(off + p, k)
            done.add(off)
        d[0] = regions[off]
    view = buf.view()
    view.flags.writeable = False
    return view
