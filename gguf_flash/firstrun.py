"""First run: the kernels a model needs are compiled once, in a child process, with progress.

numba compiles a kernel the first time it is called with new argument types and caches the machine
code on disk (kernels/__init__.py names the folder). Left alone, a first `run` would sit silent for
half a minute and LLVM's compiling memory (~220 MB) would count in the process's RSS. So before a
model's first kernel call, `ensure_compiled` checks a marker in the cache folder for this model's
kind (dense or flash), type set (dispatch.type_set), KV cache type and prompt-logit path; when it is
missing, a child process runs the model's compiled calls on tiny inputs (every kernel it needs, and
only those), reporting each kernel as numba starts compiling it. The parent then loads them from the
cache (about a second). The CLI shows a progress bar on stderr; library users get logging (INFO).
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

KINDS = ("dense", "flash")
# seconds of one core's compiling, measured on a 2-core EPYC with an empty cache (README "Performance"):
# the type-independent kernels, then each quant type's own (matvec, matmat, row kernels)
_BASE_S = {"dense": 22, "flash": 40}
_PER_TYPE_S = {"dense": 3, "flash": 5}


def cache_folder() -> str:
    """numba's cache folder for this package's kernel sources (set when gguf_flash.kernels is imported)."""
    import numba
    from . import kernels  # noqa: F401  (points numba's cache at the kernel-source hash)
    return numba.config.CACHE_DIR


def marker(kind: str, tset, kv_type: str = "f16", logit_rows: int = 0) -> str:
    """The marker of one compiled set of kernels. numba files its cache by each module's source path, so
    a checkout in another folder (CI's fresh clone) compiles again: the marker names the package folder."""
    from .kernels.dispatch import type_names
    here = hashlib.sha256(os.path.dirname(os.path.abspath(__file__)).encode()).hexdigest()[:12]
    rows = "-rows" if logit_rows > 1 else ""
    name = f"{kind}-{here}-{'_'.join(type_names(tset))}-{kv_type}{rows}.warm"
    return os.path.join(cache_folder(), name)


def is_compiled(kind: str, tset, kv_type: str = "f16", logit_rows: int = 0) -> bool:
    return os.path.exists(marker(kind, tset, kv_type, logit_rows))


def estimate_s(kind: str, tset) -> int:
    """A rough figure for the progress line: seconds of compiling on one free core."""
    from .kernels.dispatch import type_names
    return _BASE_S[kind] + _PER_TYPE_S[kind] * len(type_names(tset))


def headline(kind: str, tset) -> str:
    from .kernels.dispatch import type_names
    where = cache_folder().replace(os.path.expanduser("~"), "~", 1)
    return (f"compiling kernels for {', '.join(type_names(tset))} (first run only, about "
            f"{estimate_s(kind, tset)} s; cached in {where})")


def ensure_compiled(path, kind: str, tset, kv_type: str = "f16", logit_rows: int = 0,
                    progress: bool = False) -> None:
    """Compile (in a child process) the kernels a `kind` model on `path` with type set `tset` uses,
    unless its marker says they are cached. progress: a bar on stderr (the CLI); else INFO logging.
    A child that fails is not an error: the caller then compiles in-process, as it would anyway."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    if is_compiled(kind, tset, kv_type, logit_rows):
        return
    head = headline(kind, tset)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        print(f"gguf-flash: {head}", file=sys.stderr, flush=True)
        bar = tqdm(desc="compiling", unit=" kernels", file=sys.stderr, mininterval=0.5, leave=True,
                   bar_format="{desc}: {n} kernels, {elapsed} {postfix}")
    else:
        log.info(head)
    code = "import sys; from gguf_flash.firstrun import _child; _child(*sys.argv[1:])"
    argv = [sys.executable, "-c", code, os.fspath(path), kind, kv_type, str(int(logit_rows))]
    ok, last = _run_child(argv, bar)
    secs = time.perf_counter() - t0
    if bar is not None:
        bar.set_postfix_str("done" if ok else "failed", refresh=False)
        bar.close()
    if ok:
        log.info("kernels compiled in %.0f s", secs)
    else:
        log.warning("kernel compile child failed (%s); compiling in this process", last)


def _run_child(argv, bar) -> tuple[bool, str]:
    """Run the compile child; each stdout line names a kernel numba started compiling. Returns
    (succeeded, its last stderr line). The bar is redrawn every second so its clock keeps moving."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return False, str(e)
    lines: queue.Queue = queue.Queue()
    err: list = []

    def read_names():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read_names, daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    n = 0
    while True:
        try:
            name = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                break
            if bar is not None:
                bar.refresh()
            continue
        n += 1
        if bar is not None:
            bar.set_postfix_str(name.strip(), refresh=False)
            bar.update(1)
        else:
            log.debug("compiling %s", name.strip())
    rc = proc.wait()
    last = err[-1].strip() if err else f"exit code {rc}"
    return rc == 0, last


def _child(path, kind, kv_type, logit_rows) -> None:
    """In the child: print each kernel's name as numba starts compiling it, run the model's compiled
    calls on tiny inputs, and leave the marker."""
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
        from .flash.runtime import warm_kernels
        tset = warm_kernels(f, kv_type=kv_type, logit_rows=logit_rows)
    else:
        from .model import Model
        m = Model(f, n_ctx=16, kv_type=kv_type)
        m.prefill([0, 0], 0)     # the prompt batch and the head
        m.forward(0, 2)          # the decode step
        tset = m.w.ts
    with open(marker(kind, tset, kv_type, logit_rows), "w") as fh:
        fh.write(f"{kind} kernels of {os.path.dirname(os.path.abspath(__file__))} compiled\n")
