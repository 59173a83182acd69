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


def compile_in_child(code: str, *argv: str) -> None:
    """Run `python -c code argv...` to compile (or load) kernels in a child process, so that LLVM's
    ~220 MB of compiling never adds to the caller's RSS (the converter's peak, the flash runtime's measured
    baseline). A failing child is not an error: the caller then compiles in-process, as it would anyway."""
    import logging
    import subprocess
    import sys
    log = logging.getLogger(__name__)
    try:
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=1800)
        if out.returncode:
            log.info("kernel compile child failed: %s", out.stderr.strip().splitlines()[-1:])
    except (OSError, subprocess.SubprocessError) as e:
        log.info("kernel compile child failed: %s", e)
