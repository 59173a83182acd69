"""Micro-benchmark of the basic quant kernels (gguf_flash/kernels/quant_basic.py).

matvec: weight GB/s (weight bytes / time), the decode-path figure that matters: a token reads every
weight byte once (SmolLM2-135M: ~96 MB/token, so 77 tok/s needs ~7.4 GB/s on 2 threads).
matmat: GFLOP/s (2 * n_tok * n_rows * n_cols / time) for a 128-token prompt batch.
Random weights, read-only like a memory-mapped GGUF. Usage: python tools/bench_kernels.py [--threads 2]
"""
import argparse
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from gguf_flash.kernels.quant_basic import TABLE, TABLE_Q8X, q8x_scratch_bytes, quantize_x_q8

SHAPES = [  # (n_rows, n_cols, type): SmolLM2-135M's FFN up/gate, FFN down, tied output head
    (1536, 576, Q.Q4_1),
    (576, 1536, Q.Q4_1),
    (49152, 576, Q.Q8_0),
]


def make_weights(n_rows, n_cols, qtype, rng):
    a = rng.standard_normal((n_rows, n_cols), dtype=np.float32)
    w = quants.quantize(a, qtype)  # (n_rows, row_bytes) uint8
    w.setflags(write=False)
    return w


def best_time(fn, min_total=0.3, reps_max=2000):
    fn()  # warm-up / compile
    times = []
    t_end = time.perf_counter() + min_total
    while len(times) < reps_max and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-tok", type=int, default=128)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads={numba.get_num_threads()}")
    for n_rows, n_cols, qtype in SHAPES:
        w = make_weights(n_rows, n_cols, qtype, rng)
        _, _, _, matvec, matmat = TABLE[int(qtype)]
        x = rng.standard_normal(n_cols, dtype=np.float32)
        out = np.empty(n_rows, np.float32)
        tmin, tmed = best_time(lambda: matvec(out, w, x))
        gbs = w.nbytes / tmin / 1e9
        # llama.cpp-style path: quantize x to Q8 once (timed with it), integer block dots
        scratch = np.empty(q8x_scratch_bytes(n_cols), np.uint8)
        matvec_q8x = TABLE_Q8X[int(qtype)][1]

        def q8x():
            quantize_x_q8(scratch, x)
            matvec_q8x(out, w, scratch)

        qmin, _ = best_time(q8x)
        X = rng.standard_normal((args.n_tok, n_cols), dtype=np.float32)
        outm = np.empty((args.n_tok, n_rows), np.float32)
        mmin, _ = best_time(lambda: matmat(outm, w, X), min_total=0.5, reps_max=20)
        gflops = 2.0 * args.n_tok * n_rows * n_cols / mmin / 1e9
        print(f"{qtype.name:5s} {n_rows:6d} x {n_cols:5d} ({w.nbytes / 1e6:6.2f} MB): "
              f"matvec {tmin * 1e6:7.1f} us (median {tmed * 1e6:7.1f}) = {gbs:5.2f} GB/s | "
              f"q8x {qmin * 1e6:7.1f} us = {w.nbytes / qmin / 1e9:5.2f} GB/s | "
              f"matmat[{args.n_tok}] {mmin * 1e3:6.2f} ms = {gflops:5.1f} GFLOP/s")


if __name__ == "__main__":
    main()
