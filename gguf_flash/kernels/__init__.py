"""numba kernels. Importing this package points numba's on-disk cache at a folder named after a hash
of the kernel sources, because numba's cache only notices edits to a function's own module: a kernel
that calls a kernel from another module would otherwise keep stale machine code after an edit.
A first run compiles the kernels of the model's types in a child process (gguf_flash/firstrun.py);
cold start: README "Performance"."""

import hashlib
import secrets
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


class _RandomIds:
    """numba's FunctionIdentity ids, drawn at random instead of counted from 1 in each process.

    Why: a compiled function's symbol is its module.qualname, argument types and this id
    (itanium_mangler: the "v<id>" ABI tag). Counted ids repeat across processes, and so do the names
    numba gives the loop bodies of parallel kernels ("__numba_parfor_gufunc_<hash of an object>"): two
    different functions compiled by two processes into one on-disk cache could get the same symbol with
    different code, and a later process that loaded both jumped into the wrong one. That happened here:
    after runs with f16 and f32 KV caches filled one cache, `Model(f).forward(1, 0)` segfaulted in
    forward_token (numba issue #10486). Random 63-bit ids make such a collision as unlikely as a random
    63-bit clash."""

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return secrets.randbits(63)


def _unique_symbols() -> None:
    from numba.core.bytecode import FunctionIdentity
    FunctionIdentity._unique_ids = _RandomIds()


_unique_symbols()


def _start_parallel_runtime() -> None:
    """Start numba's thread pool now, before any cached kernel is loaded.

    Why: a cached function that is not parallel itself but calls parallel ones (forward_batch ->
    matmat_*, forward_token -> matvec_*, flashstep.layer_select -> matvec_rows) refers to the parallel
    runtime's symbols, which numba registers with LLVM only when it starts its threads. If that function
    was compiled in a process that loaded its parallel callees from the cache, loading it in a fresh
    process before any parallel kernel ran jumped to an unresolved address: a segfault (numba issue
    #8578). Seen here: `Model(f).prefill([1, 2, 3])` on SmolLM2 crashed in forward_batch after other
    processes had filled the cache, and ran once the threads were started first (a 20-line reproduction
    with one parallel callee behaves the same). numba.get_num_threads() starts them."""
    numba.get_num_threads()



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
_start_parallel_runtime()


def release_compiler_pages() -> int:
    """Hand LLVM's code pages back to the OS once every kernel is loaded; returns the bytes released.

    LLVM (libllvmlite.so) is needed to compile and to load cached kernels, not to run them: after the
    warm-up its ~70 MiB of machine code and read-only data sit in our RSS unused. Only mappings that are
    not writable and have no private dirty page are dropped (MADV_DONTNEED), so their pages read back
    from the library file unchanged if LLVM runs again (a later compile faults them in, slower but
    correct). Linux only; elsewhere it does nothing."""
    import ctypes
    import re
    try:
        smaps = open("/proc/self/smaps").read()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    MADV_DONTNEED = 4
    released = 0
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+ +(\S*libllvmlite\S*)\n(.*?)(?=^[0-9a-f]+-|\Z)",
                         smaps, re.M | re.S):
        start, end, perms, body = int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(5)
        fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", body, re.M))
        if "w" in perms or int(fields.get("Private_Dirty", 1)) or int(fields.get("Anonymous", 1)):
            continue
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += int(fields.get("Rss", 0)) << 10
    return released
