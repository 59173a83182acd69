"""Per-layer sparsity allocation against one sparsity for all layers (issue 13, 3a), on held-out loss.

What it measures, for a model and each criterion (gate |act(g_i)|, product |act(g_i) u_i| ||down_i||):
  - the converter's calibration (4,096 tokens of pydoc_data.topics, chunks of 512: 6 training chunks, 2
    held out) and its per-layer quantile thresholds (convert_stats.SparsityStats);
  - the drive tokens: the last --drive-chunks training chunks; the judge tokens: the 2 held-out chunks
    (the converter's held-out curve). The allocation is chosen on the drive tokens only;
  - uniform: perplexity on drive and judge at each grid sparsity (every layer the same);
  - per-layer costs on the drive tokens: mean NLL increase with layer l alone sparsified at each of
    --levels (allocate.layer_costs: from the dense states entering layer l);
  - allocations: TEAL's greedy path on those costs (allocate.greedy_path), at each of --means, each
    verified by a whole pass on drive and on judge. "mono" also: the costs clipped at 0 and made
    nondecreasing in the level per layer (less of the drive tokens' noise).
  - --mean-correction: at each uniform point also the judge perplexity with a per-layer mean correction
    of what the sparsified FFN leaves out (mean_correction below: a constant vector per layer, added to
    the residual after the layer; estimated on the last CHUNKS training chunks, the drive among them,
    never on the judge; cached per CHUNKS).
Prints, per criterion, uniform and allocated perplexity (drive, judge) against mean sparsity, and the
largest mean within 2% of dense chosen on drive with its judge perplexity. Results are cached in
OUT/results.json (a rerun measures only what is missing).

    python tools/bench_alloc.py smollm2 /tmp/alloc-smollm2 [--levels gate=3,5,7,9 product=5,7,9,11]
        [--means gate=0.2,0.25,0.3,0.35 product=0.35,0.4,0.45,0.5,0.55] [--drive-chunks 1]
        [--uniform gate=1,...,8 product=3,...,11] [--criteria gate,product] [--mean-correction 4] [--no-alloc]

Levels and means are grid indices (SPARSITY_GRID: 0 is 0.05) and mean sparsities.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from gguf_flash import models
from gguf_flash.config import config_from_gguf
from gguf_flash.flash import convert as cv
from gguf_flash.flash.allocate import greedy_path, layer_costs
from gguf_flash.flash.calibrate import calibrate, read_calibration_text
from gguf_flash.flash.convert_stats import SparsityStats
from gguf_flash.flash.layerwise import LayerPass, Sequence
from gguf_flash.gguf_file import GGUFFile
from gguf_flash.model import Model
from gguf_flash.tokenizer import tokenizer_from_gguf



def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def parse_map(items, conv):
    return {k: [conv(x) for x in v.split(",")] for k, v in (i.split("=") for i in items)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--levels", nargs="*", default=["gate=3,5,7,9", "product=5,7,9,11"])
    ap.add_argument("--means", nargs="*", default=["gate=0.2,0.25,0.3,0.35", "product=0.35,0.4,0.45,0.5,0.55"])
    ap.add_argument("--uniform", nargs="*", default=["gate=1,2,3,4,5,6,7,8", "product=3,4,5,6,7,8,9,10,11"],
                    help="grid indices of the uniform curve")
    ap.add_argument("--drive-chunks", type=int, default=1)
    ap.add_argument("--criteria", default="gate,product")
    ap.add_argument("--no-alloc", action="store_true", help="uniform (and mean-corrected) points only")
    ap.add_argument("--mean-correction", type=int, default=0, metavar="CHUNKS",
                    help="also measure a per-layer mean correction estimated on the last CHUNKS training chunks")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = GGUFFile(models.resolve(a.model))
    cfg = config_from_gguf(f)
    model = Model(f, n_ctx=512)
    lp = LayerPass(model)
    grid = np.array(cv.SPARSITY_GRID)
    L, chunk = cfg.n_layer, 512

    stats_path = out / "stats.npz"
    if not stats_path.exists():
        stats = SparsityStats(f, cfg, grid, True)
        cal = calibrate(model, tokenizer_from_gguf(f), read_calibration_text(None)[0], 4096, chunk, cv.HELD_OUT,
                        on_layer=stats.add, spill_dir=out)
        np.savez(stats_path, q=stats.q, qp=stats.qp, dn=stats.dn, tokens=cal.tokens, n_train=cal.n_train)
        cal.close()
        log("calibrated")
    S = np.load(stats_path)
    tokens, n_train = S["tokens"], int(S["n_train"])
    train = [Sequence(tokens[s:s + chunk]) for s in range(0, n_train, chunk)]
    drive = train[-a.drive_chunks:]
    judge = [Sequence(tokens[s:s + chunk]) for s in range(n_train, len(tokens), chunk)]
    crit = {"gate": (S["q"], None), "product": (S["qp"], S["dn"])}

    res_path = out / "results.json"
    R = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save():
        res_path.write_text(json.dumps(R, indent=1))

    def nll(seqs, thr, scale):
        total, n = lp.nll(seqs, np.asarray(thr, np.float32), scale)
        return total / n

    if "dense" not in R:
        R["dense"] = {"drive": nll(drive, np.zeros(L), None), "judge": nll(judge, np.zeros(L), None)}
        save()
    levels, means, uniform = parse_map(a.levels, int), parse_map(a.means, float), parse_map(a.uniform, int)
    for c in a.criteria.split(","):
        Q, scale = crit[c]
        U = R.setdefault(f"uniform_{c}", {})
        for j in uniform[c]:
            if str(j) not in U:
                U[str(j)] = [nll(drive, Q[:, j], scale), nll(judge, Q[:, j], scale)]
                log(c, "uniform", grid[j], np.exp(U[str(j)]))
                save()
        M = R.setdefault(f"meancorr{a.mean_correction}_{c}", {})   # per chunk count
        for j in uniform[c] if a.mean_correction else ():
            if str(j) not in M:
                thr = np.ascontiguousarray(Q[:, j], np.float32)
                B = mean_correction(lp, train[-a.mean_correction:], thr, scale)
                M[str(j)] = [nll_corrected(lp, drive, thr, scale, B), nll_corrected(lp, judge, thr, scale, B)]
                log(c, "mean-corrected", grid[j], np.exp(M[str(j)]))
                save()
        if a.no_alloc:
            continue
        SE = R.setdefault(f"sens_{c}", {})
        if not all(str(j) in SE for j in levels[c]):
            costs, _ = layer_costs(lp, drive, Q, scale, levels[c])
            for k, j in enumerate(levels[c]):
                SE[str(j)] = list(costs[:, k])
            log(c, "per-layer costs (1e-3 nats) at", grid[levels[c]], "\n", np.round(costs.T * 1e3, 2))
            save()
        js = sorted(SE, key=int)
        C = np.array([SE[j] for j in js]).T                               # (L, levels)
        for variant, CC in (("raw", C), ("mono", np.maximum.accumulate(np.maximum(C, 0), axis=1))):
            path = greedy_path(CC, grid[[int(j) for j in js]])
            A = R.setdefault(f"alloc_{c}_{variant}", {})
            for m in means[c]:
                if str(m) in A:
                    continue
                mean, at = next(p for p in path if p[0] >= m - 1e-9)
                jl = [int(js[k]) if k >= 0 else -1 for k in at]
                thr = [Q[il, j] if j >= 0 else 0.0 for il, j in enumerate(jl)]
                A[str(m)] = dict(mean=mean, layers=[float(grid[j]) if j >= 0 else 0.0 for j in jl],
                                 drive=nll(drive, thr, scale), judge=nll(judge, thr, scale))
                log(c, variant, "mean", round(mean, 3), "ppl drive, judge", np.exp([A[str(m)]["drive"],
                                                                                   A[str(m)]["judge"]]))
                save()
    report(R, grid)


def mean_correction(lp, seqs, thr, scale) -> np.ndarray:
    """B (n_layer, n_embd) f32: per layer, the mean over the tokens of `seqs` of (dense layer output -
    sparsified layer output), both from the same input; the input is the corrected sparse pass's own
    state (so B[l] accounts for the corrections before it)."""
    L = lp.model.cfg.n_layer
    X, rope = lp.embed(seqs)
    B = np.zeros((L, X.shape[1]), np.float32)
    for il in range(L):
        Xd = X.copy()
        lp.layers(seqs, Xd, rope, il, il + 1, np.zeros(L, np.float32), scale)
        lp.layers(seqs, X, rope, il, il + 1, thr, scale)
        B[il] = (Xd - X).mean(axis=0)
        X += B[il]
    return B


def nll_corrected(lp, seqs, thr, scale, B) -> float:
    """Mean NLL of the sparsified pass with B[l] added to the residual after each layer l."""
    X, rope = lp.embed(seqs)
    for il in range(lp.model.cfg.n_layer):
        lp.layers(seqs, X, rope, il, il + 1, thr, scale)
        X += B[il]
    total, n = lp.states_nll(seqs, lp.final(X))
    return total / n


def report(R, grid):
    d = R["dense"]
    budget = np.log(cv.PPL_BUDGET)
    print(f"\ndense perplexity: drive {np.exp(d['drive']):.3f}, judge {np.exp(d['judge']):.3f}")
    for c in ("gate", "product"):
        if f"uniform_{c}" not in R:
            continue
        rows = [("uniform", grid[int(j)], v[0], v[1]) for j, v in R[f"uniform_{c}"].items()]
        corrected = sorted(k for k in R if k.startswith("meancorr") and k.endswith(f"_{c}"))
        rows += [(f"mean-corrected ({k[8:-len(c) - 1]} chunks)", grid[int(j)], v[0], v[1])
                 for k in corrected for j, v in R[k].items()]
        for variant in ("raw", "mono"):
            rows += [(variant, v["mean"], v["drive"], v["judge"]) for v in R.get(f"alloc_{c}_{variant}", {}).values()]
        print(f"\n{c}: | allocation | mean sparsity | drive ppl (vs dense) | judge ppl (vs dense) |")
        for name, m, dr, ju in sorted(rows, key=lambda r: (r[0], r[1])):
            print(f"| {name} | {m:.3f} | {np.exp(dr):.3f} ({100 * np.expm1(dr - d['drive']):+.1f}%) | "
                  f"{np.exp(ju):.3f} ({100 * np.expm1(ju - d['judge']):+.1f}%) |")
        for name in ("uniform", *sorted({r[0] for r in rows if r[0].startswith("mean")}), "raw", "mono"):
            ok = [r for r in rows if r[0] == name and r[2] - d["drive"] <= budget]
            okj = [r for r in rows if r[0] == name and r[3] - d["judge"] <= budget]
            if ok:
                best = max(ok, key=lambda r: r[1])
                print(f"{c} {name}: chosen on drive {best[1]:.3f} -> judge {100 * np.expm1(best[3] - d['judge']):+.1f}%"
                      + (f"; largest within 2% on judge {max(r[1] for r in okj):.3f}" if okj else ""))


if __name__ == "__main__":
    main()
