"""Two numba caching hazards our kernels hit.

(1) numba names each compiled function by module.qualname, argument types and a per-process id; counted
from 1 in every process, two processes filling one on-disk cache could give two different functions the
same symbol, and a later process that loads both jumps into the wrong one (a segfault seen here in
forward_token; numba issue #10486). gguf_flash.kernels draws the ids at random.
(2) A cached caller of a parallel kernel could not be loaded before numba's threads started (below)."""

import subprocess
import sys

CHILD = r"""
import gguf_flash.kernels  # noqa: F401  (draws numba's function ids at random)
from numba import njit
from numba.core.bytecode import FunctionIdentity

@njit
def f(x):
    return x + 1

f(1)
print(next(FunctionIdentity._unique_ids), f.overloads[f.signatures[0]].fndesc.mangled_name)
"""


def _child():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    uid, name = out.stdout.split()
    return int(uid), name


def test_compiled_symbols_differ_between_processes():
    (uid_a, name_a), (uid_b, name_b) = _child(), _child()
    assert name_a != name_b                 # the same function, types and compile order: counted ids matched
    assert uid_a != uid_b
    assert uid_a.bit_length() > 20 and uid_b.bit_length() > 20   # not a small counter


MODULE = '''
from numba import njit, prange

@njit(cache=True, parallel=True)
def par(out, x):
    for i in prange(x.shape[0]):
        out[i] = x[i] * 2.0

@njit(cache=True)
def outer(out, x):
    par(out, x)
    return out.sum()
'''

STEP = r"""
import sys
import numpy as np
import gguf_flash.kernels  # noqa: F401  (starts numba's thread pool)
import numba
numba.config.CACHE_DIR = sys.argv[2]
sys.path.insert(0, sys.argv[1])
import tinymod
x = np.arange(100, dtype=np.float64)
out = np.zeros_like(x)
if sys.argv[3] == "par":
    tinymod.par(out, x)
    print(out.sum())
else:
    print(tinymod.outer(out, x))
"""


def test_a_cached_caller_of_a_parallel_kernel_loads_in_a_fresh_process(tmp_path):
    """numba issue #8578: a cached function that calls a parallel one, compiled in a process that had
    loaded the parallel one from the cache, segfaulted when a fresh process loaded it before any parallel
    kernel ran (forward_batch here, once several processes had filled one kernel cache). Importing
    gguf_flash.kernels starts numba's threads first, which registers what such a function refers to.
    Without that the third process below dies with SIGSEGV (checked by hand)."""
    (tmp_path / "tinymod.py").write_text(MODULE)
    cache = tmp_path / "cache"
    for step in ("par", "outer", "outer"):   # compile par; compile outer over the cached par; load outer
        proc = subprocess.run([sys.executable, "-c", STEP, str(tmp_path), str(cache), step], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, (step, proc.returncode, proc.stderr[-500:])
        assert float(proc.stdout.split()[-1]) == 9900.0
