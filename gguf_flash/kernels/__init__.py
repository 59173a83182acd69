"""numba kernels. Importing this package points numba's on-disk cache at a folder named after a hash
of the kernel sources, because numba's cache only notices edits to a function's own module: a kernel
that calls a kernel from another module would otherwise keep stale machine code after an edit.
Cold start (first process compiles everything): see README "Performance"."""

import hashlib
import os
from pathlib import Path

import numba


def _cache_dir() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(here.glob("*.py")) + [here.parent / "config.py"]:
        h.update(p.read_bytes())
    h.update(numba.__version__.encode())
    base = os.environ.get("GGUF_FLASH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gguf-flash"))
    return os.path.join(base, "numba", h.hexdigest()[:16])


numba.config.CACHE_DIR = _cache_dir()


def _import_numba_np_without_scipy():
    """numba's first compile or cache load imports numba.np.arraymath, which imports scipy.linalg
    (0.27 s of a 1.5 s time to first token here) only to choose how np.correlate/np.convolve take inner
    products. Our kernels use neither, so import it with scipy.linalg hidden when scipy is not loaded
    yet; np.dot in anyone's numba code still works (numba imports scipy again when compiling it)."""
    import sys
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg"]


_import_numba_np_without_scipy()
