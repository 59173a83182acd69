"""First run: the kernels a model needs are compiled once, in a child process, with a progress line.

numba compiles a kernel the first time it is called with new argument types and caches the machine
code on disk (kernels/__init__.py names the folder). Every kernel that reaches a per-type kernel takes
the model's type set (kernels/dispatch.py), so only the types the model has are compiled: SmolLM2's
Q4_1 and Q8_0, not all 14. Before a model's first kernel call, `ensure_compiled` looks for a marker in
the cache folder for this kind of use (dense, flash or convert), type set, KV cache type and
prompt-logit path; when it is missing, a child process runs the model's compiled calls on tiny inputs
(every kernel it needs, and only those) and prints each kernel's name as numba starts compiling it. The
parent then loads them from the cache (about a second), and LLVM's compiling memory (~220 MB) never
counts in its RSS (a flash plan measures it; the converter's peak). The CLI shows one line on stderr
("compiling kernels for Q4_1, Q8_0 (first run only, ~28 s; cached in ...)"), redrawn each second, when
stderr is a terminal; to a pipe or file it prints nothing (scripts and tests see only their output and
one-line errors). Either way the same is logged (INFO, logger gguf_flash.firstrun).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

KINDS = ("dense", "flash", "convert")
# seconds of compiling on a 2-core EPYC with an empty cache (README "Performance"): the type-independent
# kernels, then each quant type's own (matvec, matmat, row kernels inlined in the callers)
_BASE_S = {"dense": 28, "flash": 40, "convert": 30}
_PER_TYPE_S = {"dense": 4, "flash": 8, "convert": 6}


def cache_folder() -> str:
    """numba's cache folder for this package's kernel sources (set when gguf_flash.kernels is imported)."""
    import numba
    from . import kernels  # noqa: F401  (points numba's cache at the kernel-source hash)
    return numba.config.CACHE_DIR


def marker(kind: str, tset, kv_type: str = "f16", logit_rows: int = 0, extra: str = "") -> str:
    """The marker of one compiled set of kernels. numba files its cache by each module's source path, so
    a checkout in another folder (CI's fresh clone) compiles again: the marker names the package folder.
    extra: more that decides which kernels run ('index': a flash file's head index)."""
    from .kernels.dispatch import type_names
    here = hashlib.sha256(os.path.dirname(os.path.abspath(__file__)).encode()).hexdigest()[:12]
    rows = "-rows" if logit_rows > 1 else ""
    name = f"{kind}-{here}-{'_'.join(type_names(tset))}-{kv_type}{rows}{'-' + extra if extra else ''}.warm"
    return os.path.join(cache_folder(), name)


def is_compiled(kind: str, tset, kv_type: str = "f16", logit_rows: int = 0, extra: str = "") -> bool:
    return os.path.exists(marker(kind, tset, kv_type, logit_rows, extra))


def estimate_s(kind: str, tset) -> int:
    """A rough figure for the progress line: seconds of compiling with both cores free."""
    from .kernels.dispatch import type_names
    return _BASE_S[kind] + _PER_TYPE_S[kind] * len(type_names(tset))


def headline(kind: str, tset) -> str:
    """'compiling kernels for Q4_1, Q8_0 (first run only, ~28 s; cached in ~/.cache/gguf-flash/numba/...)'"""
    from .kernels.dispatch import type_names
    home = os.path.expanduser("~")
    where = cache_folder()
    if where.startswith(home + os.sep):
        where = "~" + where[len(home):]
    return (f"compiling kernels for {', '.join(type_names(tset))} (first run only, ~{estimate_s(kind, tset)} s; "
            f"cached in {where})")


def ensure_compiled(path, kind: str, tset, kv_type: str = "f16", logit_rows: int = 0,
                    progress: bool = False, stream=None, extra: str = "") -> list | None:
    """Compile (in a child process) the kernels a `kind` use of the model file `path` with type set
    `tset` needs, unless its marker says they are cached. progress: one line on `stream` (stderr) if it
    is a terminal, redrawn each second. Returns the names of the kernels the child compiled (None when
    the marker was there). A child that fails is not an error: the caller then compiles in-process, as
    it would without this."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    if is_compiled(kind, tset, kv_type, logit_rows, extra):
        return None
    stream = stream or sys.stderr
    tty = progress and getattr(stream, "isatty", lambda: False)()
    line = _Line(stream, f"gguf-flash: {headline(kind, tset)}") if tty else None
    log.info(headline(kind, tset))
    # the child imports this very package: `python -c` puts the working folder first on sys.path, and a
    # user who ran `pip install .` in a checkout and stayed there would compile the checkout's kernels
    # (numba files them by source path), not the installed ones this process then loads
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gguf_flash.firstrun import _child; "
            "_child(*sys.argv[2:])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-c", code, root, os.fspath(path), kind, kv_type, str(int(logit_rows)), extra]
    t0 = time.perf_counter()
    ok, names, last = _run_child(argv, line)
    secs = time.perf_counter() - t0
    if line is not None:
        line.done(f"{len(names)} kernels compiled in {secs:.0f} s" if ok else
                  f"failed after {secs:.0f} s ({last}); compiling in this process")
    if ok:
        log.info("%d kernels compiled in %.0f s", len(names), secs)
    else:
        log.warning("kernel compile child failed (%s); compiling in this process", last)
    return names


class _Line:
    """The progress line on a terminal, redrawn in place: the headline, then ': 12 s, 31 kernels,
    forward_token' while the child works and ': 98 kernels compiled in 41 s' at the end."""

    def __init__(self, stream, head: str):
        self.stream, self.head = stream, head
        self.t0 = time.perf_counter()
        self.width = 0
        self._write(head)

    def _write(self, text: str, end: str = "") -> None:
        try:
            self.stream.write("\r" + text + " " * max(0, self.width - len(text)) + end)
            self.stream.flush()
        except (OSError, ValueError):
            pass
        self.width = len(text)

    def update(self, n: int, name: str) -> None:
        self._write(f"{self.head}: {time.perf_counter() - self.t0:.0f} s, {n} kernels, {name}")

    def done(self, outcome: str) -> None:
        self._write(f"{self.head}: {outcome}", "\n")


def _run_child(argv, line) -> tuple[bool, list, str]:
    """Run the compile child; each stdout line names a kernel numba started compiling. Returns
    (succeeded, the names, its last stderr line). The line is redrawn every second so its clock moves."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return False, [], str(e)
    names: queue.Queue = queue.Queue()
    err: list = []

    def read_names():
        for name in proc.stdout:
            names.put(name.strip())

    threading.Thread(target=read_names, daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    got: list = []
    try:
        while True:
            try:
                got.append(names.get(timeout=1.0))
                log.debug("compiling %s", got[-1])
            except queue.Empty:
                if proc.poll() is not None and names.empty():
                    break
            if line is not None:
                line.update(len(got), got[-1] if got else "")
        rc = proc.wait()
    except BaseException:          # Ctrl-C: the child goes too
        proc.kill()
        proc.wait()
        raise
    last = err[-1].strip() if err else f"exit code {rc}"
    return rc == 0, got, last


def _child(path, kind, kv_type, logit_rows, extra) -> None:
    """In the child: print each kernel's name as numba starts compiling it, run the compiled calls of
    `kind` on the model at `path` on tiny inputs, and leave the marker."""
    from numba.core import event

    class Names(event.Listener):
        def on_start(self, ev):
            d = ev.data.get("dispatcher")
            name = getattr(getattr(d, "py_func", None), "__name__", None)
            if name:
                print(name, flush=True)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Names())
    from .gguf_file import GGUFFile
    f = GGUFFile(path)
    logit_rows = int(logit_rows)
    if kind == "flash":
        from .flash.runtime import preload_kernels
        tset = preload_kernels(f, kv_type=kv_type, logit_rows=logit_rows)
    elif kind == "convert":
        from .flash.convert import exercise_kernels
        tset = exercise_kernels(f)
    else:
        from .model import Model
        m = Model(f, n_ctx=16, kv_type=kv_type)
        m.prefill([0, 0], 0)     # the prompt batch and the head
        m.forward(0, 2)          # the decode step
        tset = m.w.ts
    with open(marker(kind, tset, kv_type, logit_rows, extra), "w") as fh:
        fh.write(f"{kind} kernels of {os.path.dirname(os.path.abspath(__file__))} compiled\n")
