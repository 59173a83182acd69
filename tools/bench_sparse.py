"""The sparse FFN kernel alone (kernels/sparse.sparse_ffn_range), ns per chosen row, on a flash file's
real bundles: what the flash step's FFN costs without attention, selection, reads or Python.

    python tools/bench_sparse.py FLASH [--threads 1] [--active 0.8] [--reps 20]

Every layer's bundle rows are copied into RAM (one "window" per layer, rows in slot order), a random
`--active` share of rows is chosen per layer (increasing, as the selector returns them), and the kernel
runs over them for each kind of selector input: gate rows (act(gate) known: up dot + down axpy),
product (h known: down axpy), bundle (nothing known: gate dot, activation, up dot, down axpy).
"in cache": layer 0 again and again; "30 layers" (or however many): every layer in turn, the
working set of a decode step with everything resident. Minimum over --reps runs (the machine is
noisy; the minimum is the kernel's own cost). Quote ratios between trees measured back to back.
"""

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flash")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--active", type=float, default=0.8)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    import numba

    from gguf_flash.config import config_from_gguf
    from gguf_flash.flash.format import read_flash, t_bundle
    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.flash.ffn import down_tables
    from gguf_flash.kernels import dispatch, sparse
    from gguf_flash.kernels.nn import activate
    from gguf_flash.kernels.quant_basic import q8x_scratch_bytes
    from gguf_flash.model import thread_rows

    numba.set_num_threads(a.threads)
    f = GGUFFile(a.flash)
    cfg = config_from_gguf(f)
    info = read_flash(f, cfg)
    act = cfg.activation
    layers = []
    rng = np.random.default_rng(0)
    for il, l in enumerate(info.layers):
        n_ff = len(l.neuron_id)
        rows = np.array(f.raw(t_bundle(il)))     # (n_ff, bundle_bytes), in RAM like a full window
        offs = np.cumsum([0, *l.part_bytes]).astype(np.int64)
        active = np.sort(rng.choice(n_ff, int(a.active * n_ff), replace=False)).astype(np.int32)
        layers.append((rows, np.array(l.types, np.int64), offs, active, np.arange(n_ff, dtype=np.int32),
                       down_tables(l)))
    x = rng.standard_normal(cfg.n_embd).astype(np.float32)
    xq = np.zeros(q8x_scratch_bytes(cfg.n_embd), np.uint8)
    dispatch.quantize_x(xq, x)
    tset = dispatch.part_type_sets(l.types for l in info.layers)
    partial = thread_rows(numba.get_num_threads(), cfg.n_embd)   # as FFNLoader's
    hsum = thread_rows(numba.get_num_threads(), cfg.n_ff // 32)
    stage = np.zeros((1, layers[0][0].shape[1]), np.uint8)
    gate = rng.standard_normal(max(len(l[3]) for l in layers)).astype(np.float32)
    act_gate = np.array([activate(g, act) for g in gate], np.float32)

    def run(known, which, reps):
        best = 1e30
        for _ in range(reps):
            g = (act_gate if known == sparse.KNOWN_GATE else gate).copy()   # the kernel writes h there
            t0 = time.perf_counter()
            for rows, types, offs, active, slot, dtab in which:
                n = len(active)
                sparse.sparse_ffn_range(partial, hsum, rows, slot, stage, slot, active, n, 0, n, g, known, x, xq,
                                        types, offs, dtab, act, -1.0, tset)
            best = min(best, time.perf_counter() - t0)
        return best / sum(len(w[3]) for w in which) * 1e9

    print(f"{a.flash}: {len(layers)} layers, {a.active:.0%} of rows, {a.threads} thread(s), min of {a.reps}")
    print(f"| selector input | in cache ns/row | {len(layers)} layers ns/row |")
    print("|---|---|---|")
    for name, known in (("gate rows", sparse.KNOWN_GATE), ("product", sparse.KNOWN_H),
                        ("bundle", sparse.KNOWN_NONE)):
        run(known, layers[:1], 2)
        print(f"| {name} | {run(known, layers[:1], a.reps * 10):.1f} | {run(known, layers, a.reps):.1f} |")


if __name__ == "__main__":
    main()
