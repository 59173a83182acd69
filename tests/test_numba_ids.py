"""numba names each compiled function by module.qualname, argument types and a per-process id; counted
from 1 in every process, two processes filling one on-disk cache could give two different functions the
same symbol, and a later process that loads both jumps into the wrong one (a segfault seen here in
forward_token; numba issue #10486). gguf_flash.kernels draws the ids at random."""

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
