"""Decode matvec bandwidth per quant type on real models, against this machine's memory bandwidth (issue 15
item 2).

For each model, the weights the dense decode reads per token are grouped by type; each group is run the
way decode runs it (dispatch.matvec on the mapped file, input quantized once per matrix), cycling through
every layer's matrices so the bytes come from RAM, not from a cache that a single matrix would fit in.
GB/s = the group's bytes / the best of --reps passes. The reference is the best of a parallel read of a
1 GiB buffer (a numba prange sum) on the same threads: the bandwidth a kernel that only reads could reach.
The output head is its own row (one matrix as large as many layers).

    python tools/bench_kernels.py [smollm2 gemma3-270m qwen2-synthetic PATH ...] [--threads 2] [--reps 7]

qwen2-synthetic[-q3_k_m|-q2_k] are tools/bench_dense.py's Qwen2-0.5B-shaped files (llama.cpp's Q4_K_M,
Q3_K_M, Q2_K recipes; need llama-cpp-python).
"""
import argparse
import os
import sys
import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gguf_flash.kernels.quant_basic import q8x_scratch_bytes  # noqa: E402


@njit(cache=True, parallel=True)
def _read_all(buf):
    """XOR of every word of buf (n,) uint64, in 64 chunks read in parallel: every byte read once."""
    n_chunks = 64
    step = buf.shape[0] // n_chunks
    acc = np.zeros(n_chunks, np.uint64)
    for c in prange(n_chunks):
        s = np.uint64(0)
        for i in range(c * step, (c + 1) * step):
            s ^= buf[i]
        acc[c] = s
    return acc.sum()


def memory_bandwidth(reps: int) -> float:
    """GB/s of the best parallel read of 1 GiB."""
    buf = np.ones(1 << 27, np.uint64)   # 1 GiB, touched so its pages exist
    _read_all(buf)
    best = min(_timed(lambda: _read_all(buf)) for _ in range(reps))
    return buf.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def with_widths(m) -> list:
    """m = (offset, n_rows, row_bytes, qtype) + its input width and that input's 8-bit scratch bytes."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(m[3]))]
    n_cols = int(m[2]) // size * block
    return list(m) + [n_cols, q8x_scratch_bytes(n_cols)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    import gguf_flash
    from gguf_flash.kernels import dispatch

    @njit(cache=False)
    def run_group(blob, ms, out, x, xq, tset):
        for k in range(ms.shape[0]):
            nc, nq = ms[k, 4], ms[k, 5]
            dispatch.quantize_x(xq[:nq], x[:nc])
            dispatch.matvec(out[:ms[k, 1]], blob, ms[k, :4], x[:nc], xq[:nq], tset)

    bw = memory_bandwidth(a.reps)
    print(f"threads={a.threads}; memory read bandwidth (1 GiB, parallel, best of {a.reps}): {bw:.1f} GB/s\n")
    print("| model | type | matrices | MB per token | GB/s | of the read bandwidth |")
    print("|---|---|---|---|---|---|")
    for name in a.models:
        path = name
        if name.startswith("qwen2-synthetic"):
            from bench_dense import qwen2_synthetic
            path = qwen2_synthetic(name)
        llm = gguf_flash.load(path, n_ctx=64, n_threads=a.threads)
        w = llm.model.w
        groups = {}
        for il in range(w.mats.shape[0]):
            for j in range(w.mats.shape[1]):
                m = w.mats[il, j]
                if m[1] > 0:
                    groups.setdefault(GGMLQuantizationType(int(m[3])).name, []).append(with_widths(m))
        groups = {k: v for k, v in sorted(groups.items())}
        groups["head " + GGMLQuantizationType(int(w.output[3])).name] = [with_widths(w.output)]
        width = max(r[4] for g in groups.values() for r in g)
        rows = max(r[1] for g in groups.values() for r in g)
        x = np.random.default_rng(0).standard_normal(width).astype(np.float32)
        xq = np.zeros(q8x_scratch_bytes(width), np.uint8)
        out = np.empty(rows, np.float32)
        for tname, g in groups.items():
            ms = np.array(g, np.int64)
            run_group(w.blob, ms, out, x, xq, w.ts)
            best = min(_timed(lambda: run_group(w.blob, ms, out, x, xq, w.ts)) for _ in range(a.reps))
            nbytes = int((ms[:, 1] * ms[:, 2]).sum())
            gbs = nbytes / best / 1e9
            print(f"| {os.path.basename(str(path))} | {tname} | {len(g)} | {nbytes / 1e6:.1f} | {gbs:.1f} | "
                  f"{gbs / bw:.0%} |")
        del llm


if __name__ == "__main__":
    main()
