"""Arrays parked in an anonymous temporary file until they are written: the converter's trained
predictors (A and B float16, 3.8 MiB a layer at rank 256 on TinyLlama's shape, 84 MiB for its 22 layers),
which RSS would otherwise hold from the layer's training to the end of the write. Like calibrate.LayerFile,
the file is gone when closed or when the process dies; its pages sit in the page cache, not in RSS.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from ..atomic import write_error


def pwrite_exact(fh, data: np.ndarray, offset: int, owner, what: str) -> None:
    """Write the C-contiguous array data at offset of the open file fh, whole. A short write or an
    OSError is atomic.write_error(owner) (the output the scratch file serves: "OWNER: cannot write
    (disk full)"), or the OSError itself when owner is None."""
    try:
        n = os.pwrite(fh.fileno(), memoryview(data.reshape(-1)).cast("B"), offset) if data.nbytes else 0
        if n != data.nbytes:
            raise OSError(f"{what}: short write ({n} of {data.nbytes} bytes)")
    except OSError as e:
        if owner is None:
            raise
        raise write_error(owner, e) from None


@dataclass(frozen=True)
class Parked:
    """One array in a Spill: what a writer needs before reading it back (`load`)."""
    spill: "Spill"
    offset: int
    shape: tuple
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def load(self) -> np.ndarray:
        return self.spill.read(self)


class Spill:
    """Append-only: `put` from any thread, `read` back whole."""

    def __init__(self, dir=None, owner=None):
        """dir: where the file goes; owner: the output it serves (named by a write error: a full disk
        is "OWNER: cannot write (disk full)", atomic.write_error)."""
        self._fh = tempfile.TemporaryFile(dir=dir)
        self._owner = owner
        self._end = 0
        self._lock = threading.Lock()

    def put(self, arr: np.ndarray) -> Parked:
        data = np.ascontiguousarray(arr)
        with self._lock:
            offset, self._end = self._end, self._end + data.nbytes
        pwrite_exact(self._fh, data, offset, self._owner, "spill file")
        return Parked(self, offset, data.shape, data.dtype)

    def read(self, parked: Parked) -> np.ndarray:
        out = np.empty(parked.shape, parked.dtype)
        n = os.preadv(self._fh.fileno(), [memoryview(out.reshape(-1)).cast("B")], parked.offset) if out.nbytes else 0
        if n != out.nbytes:
            raise OSError(f"spill file: short read ({n} of {out.nbytes} bytes)")
        return out

    def close(self):
        self._fh.close()
