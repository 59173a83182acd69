"""Flash benchmark, laid out like the paper's Table 3: per-token I/O, memory management and compute
milliseconds for dense, naive and flash modes at several RAM caps, with cold reads.

    python tools/bench_flash.py MODEL.flash.gguf [--source MODEL.gguf] [--caps min,d-0.5,d-0.4,d0.9,d1.0]
                                [--modes dense,naive,flash] [--tokens 32] [--selector auto] [--plot out.png]

MODEL may be a known name (smollm2, gemma3-270m): its flash conversion in the cache is used (made
once with the converter's defaults) and the source is the known model. The yardstick is the dense
engine's own peak RSS on the source (a fresh process generating --tokens tokens, sampled from outside
every 5 ms). Caps:
  min      the smallest cap the flash plan accepts (asked of a fresh process; where the run's own process
           then needs a MiB or two more, up to three tries at the floor it asks for)
  d0.8     0.8 x the dense engine's peak RSS
  d-0.4    the dense engine's peak RSS - 0.4 x the source file
  2G       an absolute cap (also 1500M)
Every run is a fresh child process: bundles are read with O_DIRECT (the page cache cannot act as hidden
DRAM), its RSS is sampled from outside every 5 ms, and a cap the plan refuses is reported as such. The
floor of a run is (bytes it must read per token) / (this disk's throughput at its mean read size, from
`gguf-flash bench-io`'s probe) + its compute time.
"""

import argparse
import json
import os
import subprocess
import sys

# a ~112-token prompt (SmolLM2), then --tokens decode steps
PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
               "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ") * 3

CHILD = r"""
import json, sys, time
import numpy as np
import gguf_flash
from gguf_flash.errors import RamCapError
path, cap, mode, n_tok, selector, PROMPT, head = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
try:
    llm = gguf_flash.load(path, max_ram=None if cap == "none" else cap, mode=mode, n_ctx=256, n_threads=2,
                          selector=selector, cold=True, head=head if mode == "flash" else "auto")
except RamCapError as e:
    print(json.dumps({"refused": str(e), "need": e.need})); sys.exit(0)
prompt = llm.tokenize(PROMPT)
t = time.perf_counter()
res = llm.generate(prompt, n_predict=n_tok, ignore_eos=True)
st = llm.model.stats                        # decode steps (the prompt runs in chunks: prompt_stats)
m = lambda k: float(np.mean([getattr(s, k) for s in st]))
print(json.dumps(dict(io_ms=m("io_ms"), mm_ms=m("mm_ms"), compute_ms=m("compute_ms"),
                      bytes=m("bytes_read"), reads=m("read_calls"), loaded=m("loaded"), hit=m("hit_rate"),
                      overflow=m("overflow"), head_bytes=m("head_bytes"), head_rows=m("head_rows"),
                      tps=res.decode_tps, prompt_tps=res.prompt_tps, selector=llm.model.selector,
                      plan=llm.model.plan.describe(), baseline=llm.model.plan.baseline,
                      direct_io=llm.model.store.direct_io)))
"""

MIN_CAP = r"""
import sys, gguf_flash
try:
    gguf_flash.load(sys.argv[1], max_ram="1M", n_ctx=256, n_threads=2, mode=sys.argv[2])
except gguf_flash.RamCapError as e:
    print(e.need)
"""

DENSE = r"""
import json, sys, time, gguf_flash
PROMPT = sys.argv[3]
llm = gguf_flash.load(sys.argv[1], n_ctx=256, n_threads=2)
prompt = llm.tokenize(PROMPT)
res = llm.generate(prompt, n_predict=int(sys.argv[2]), ignore_eos=True)
print(json.dumps(dict(tps=res.decode_tps, ms=1e3 / max(res.decode_tps, 1e-9), prompt_tps=res.prompt_tps)))
"""


def run_child(code, args, sample=True):
    from gguf_flash.flash.budget import sample_peak_rss
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = sample_peak_rss(proc, every=0.005) if sample else 0
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"child failed: {err.strip().splitlines()[-1:]}")
    return out.strip().splitlines()[-1], peak


def disk_throughput():
    """{read size: MiB/s at 4 threads} from the saved probe of this device (probing once if needed)."""
    from gguf_flash.flash import diskprobe
    from gguf_flash.models import cache_dir
    where = cache_dir()
    rows = diskprobe.load(where)
    if not rows:
        rows = diskprobe.probe(where, sizes=(4096, 16384, 65536, 262144, 1 << 20), threads=(4,),
                               seconds=0.4, file_bytes=128 << 20)
        diskprobe.save(rows, where)
    best = {}
    for r in rows:
        best[r.size] = max(best.get(r.size, 0.0), r.mib_s)
    return dict(sorted(best.items()))


def floor_ms(bytes_per_tok, reads_per_tok, compute_ms, tput):
    if bytes_per_tok <= 0:
        return compute_ms
    size = bytes_per_tok / max(reads_per_tok, 1)
    sizes = list(tput)
    import numpy as np
    mib_s = float(np.interp(np.log2(size), np.log2(sizes), [tput[s] for s in sizes]))
    return bytes_per_tok / (mib_s * 2**20) * 1e3 + compute_ms


def model_paths(model, source):
    """(flash file, source GGUF) for a known name or a path (the source then given by --source)."""
    from gguf_flash.cli import _flash_path_for
    from gguf_flash.models import REGISTRY, resolve
    source = source or (resolve(model) if model in REGISTRY else None)
    if source is None:
        sys.exit("--source is needed: the dense engine on the source model is the yardstick")
    return _flash_path_for(model), source


def resolve_cap(spec, path, mode, dense_peak, src_size):
    """A cap spec -> MiB: min (asked of a fresh process; None when the mode has no floor), dN (N x the
    dense engine's peak RSS) or d-N (that peak - N x the source file)."""
    if spec == "min":
        need = run_child(MIN_CAP, [path, mode], sample=False)[0]
        return int(need) // 2**20 + 1 if need.strip().isdigit() else None
    if spec[-1:] in ("M", "G") and spec[:-1].replace(".", "", 1).isdigit():   # an absolute cap: 2048M, 2G
        return int(float(spec[:-1]) * (1024 if spec[-1] == "G" else 1))
    if spec.startswith("d-"):
        return int((dense_peak - float(spec[2:]) * src_size) / 2**20)
    if spec.startswith("d"):
        return int(float(spec[1:]) * dense_peak / 2**20)
    sys.exit(f"bad cap {spec!r}: min, dN (x dense peak), d-N (dense peak - N x source file) or a size (2G, 1500M)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--source", default=None, help="the source GGUF (default: the known model's)")
    ap.add_argument("--caps", default="min,d-0.5,d-0.4,d0.9,d1.0")
    ap.add_argument("--modes", default="dense,naive,flash")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--selector", default="auto", help="flash mode's selector: auto (the plan's choice), gate, "
                                                       "product, bundle, predictor; a comma list runs flash "
                                                       "mode once with each")
    ap.add_argument("--head", default="auto", help="flash mode's head: auto (the plan's choice), index, exact; "
                                                   "a comma list runs flash mode once with each")
    ap.add_argument("--plot", default=None, help="write a PNG of latency against cap (needs matplotlib)")
    a = ap.parse_args()
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the runs, not after them)
        except ImportError:
            print(f"bench_flash.py: --plot {a.plot} needs matplotlib (pip install '.[plot]')", file=sys.stderr)
            sys.exit(2)
    path, source = model_paths(a.model, a.source)
    size, src_size = os.path.getsize(path), os.path.getsize(source)
    dense_out, dense_peak = run_child(DENSE, [source, a.tokens, PROMPT_TEXT])
    dense = json.loads(dense_out)
    dense_mib = dense_peak / 2**20
    tput = disk_throughput()
    rows = []
    runs = [(m, h, s) for m in a.modes.split(",")
            for h in (a.head.split(",") if m == "flash" else ["auto"])
            for s in (a.selector.split(",") if m == "flash" else ["auto"])]
    for spec in a.caps.split(","):
        for mode, head, sel in runs:
            cap = resolve_cap(spec, path, mode, dense_peak, src_size)
            if cap is None:
                continue
            out, peak = run_child(CHILD, [path, f"{cap}M", mode, a.tokens, sel, PROMPT_TEXT, head])
            r = json.loads(out)
            for _ in range(3):
                if not (spec == "min" and "refused" in r and r.get("need")):
                    break
                # the runtime's own RSS differs between processes by a MiB or two: this process's floor
                cap = int(r["need"]) // 2**20 + 1
                out, peak = run_child(CHILD, [path, f"{cap}M", mode, a.tokens, sel, PROMPT_TEXT, head])
                r = json.loads(out)
            label = mode + ("" if head == "auto" else f", head {head}") + ("" if sel == "auto" else f", --selector {sel}")
            r.update(spec=spec, cap=cap, mode=label, peak=peak / 2**20)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    print(f"\n{os.path.basename(path)} ({size / 2**20:.0f} MiB; source {src_size / 2**20:.0f} MiB), cold reads, "
          f"2 threads, {a.tokens} decode tokens. Dense engine on the source: peak RSS {dense_mib:.0f} MiB, "
          f"{dense['ms']:.1f} ms/token, prompt {dense['prompt_tps']:.0f} tok/s (page cache warm)\n")
    print("| cap | mode | I/O ms | mem-mgmt ms | compute ms | total ms | floor ms | MiB read/token | reads | "
          "overflow/token | tok/s | prompt tok/s | peak RSS | head MiB read/token (rows) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (f"| {r['cap']} MiB = {r['cap'] / dense_mib:.2f} x dense = {r['cap'] * 2**20 / src_size:.1f} x source "
                f"({r['spec']}) | {r['mode']} |")
        if "refused" in r:
            print(f"{head} refused: needs {r['refused'].split('needs at least ')[1].split(' (')[0]} |"
                  + " |" * 11)
            continue
        total = r["io_ms"] + r["mm_ms"] + r["compute_ms"]
        fl = floor_ms(r["bytes"], r["reads"], r["compute_ms"], tput)
        sel = f" ({r['selector']})" if r["mode"].startswith("flash") else ""
        print(f"{head[:-1]}{sel} | {r['io_ms']:.1f} | {r['mm_ms']:.1f} | {r['compute_ms']:.1f} | {total:.1f} | "
              f"{fl:.1f} | {r['bytes'] / 2**20:.2f} | {r['reads']:.0f} | {r['overflow']:.0f} | {r['tps']:.1f} | "
              f"{r['prompt_tps']:.1f} | {r['peak']:.0f} MiB | {r['head_bytes'] / 2**20:.1f} ({r['head_rows']:.0f}) |")
    print("\nplans:")
    for r in rows:
        if "plan" in r:
            print(f"- {r['cap']} MiB, {r['mode']}: {r['plan']}")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in a.modes.split(","):
            pts = sorted((r["cap"] / dense_mib, r["io_ms"] + r["mm_ms"] + r["compute_ms"]) for r in rows
                         if r["mode"] == mode and "refused" not in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.axvline(1.0, color="grey", linestyle=":", label="dense engine's peak RSS")
        ax.axhline(dense["ms"], color="grey", linestyle="--", label="dense engine (page cache warm)")
        ax.set_yscale("log")
        ax.set_xlabel("RAM cap / dense engine's peak RSS")
        ax.set_ylabel("ms per token")
        ax.set_title(os.path.basename(path))
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)


if __name__ == "__main__":
    main()
