"""Flash benchmark, laid out like the paper's Table 3: per-token I/O, memory management and compute
milliseconds for dense, naive and flash modes at several RAM caps, with cold reads.

    python tools/bench_flash.py MODEL.flash.gguf [--caps 0.3,0.5,0.7,1.0] [--modes dense,naive,flash]
                                [--tokens 32] [--selector auto] [--plot out.png]

MODEL may be a known name (smollm2, gemma3-270m): its flash conversion in the cache is used (made
once with the converter's defaults). A cap is `runtime + fraction x model file bytes`, where runtime
is the process's own RSS measured by the engine before it loads the model. Every run is a fresh child
process: bundles are read with O_DIRECT (the page cache cannot act as hidden DRAM), its RSS is sampled
from outside every 5 ms, and a cap the plan refuses is reported as such. The floor of a run is
(bytes it must read per token) / (this disk's throughput at its mean read size, from
`gguf-flash bench-io`'s probe) + its compute time.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import gguf_flash
from gguf_flash.errors import RamCapError
path, cap, mode, n_tok, selector = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
try:
    llm = gguf_flash.load(path, max_ram=None if cap == "none" else cap, mode=mode, n_ctx=256, n_threads=2,
                          selector=selector, cold=True)
except RamCapError as e:
    print(json.dumps({"refused": str(e)})); sys.exit(0)
prompt = llm.tokenize("The history of the printing press begins")
t = time.perf_counter()
res = llm.generate(prompt, n_predict=n_tok, ignore_eos=True)
st = llm.model.stats[len(prompt):]          # decode steps only
m = lambda k: float(np.mean([getattr(s, k) for s in st]))
print(json.dumps(dict(io_ms=m("io_ms"), mm_ms=m("mm_ms"), compute_ms=m("compute_ms"),
                      bytes=m("bytes_read"), reads=m("read_calls"), loaded=m("loaded"), hit=m("hit_rate"),
                      tps=res.decode_tps, selector=llm.model.selector, plan=llm.model.plan.describe(),
                      direct_io=llm.model.store.direct_io)))
"""

RUNTIME = r"""
import sys, gguf_flash
try:
    gguf_flash.load(sys.argv[1], max_ram="1M", n_ctx=256, n_threads=2)
except gguf_flash.RamCapError as e:
    print(str(e).split("(")[1].split(" MiB runtime")[0])
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--caps", default="0.3,0.5,0.7,1.0")
    ap.add_argument("--modes", default="dense,naive,flash")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--selector", default="auto")
    ap.add_argument("--plot", default=None, help="write a PNG of latency against cap (needs matplotlib)")
    a = ap.parse_args()
    from gguf_flash.cli import _flash_path_for
    path = _flash_path_for(a.model)
    size = os.path.getsize(path)
    runtime_mib = float(run_child(RUNTIME, [path], sample=False)[0])
    tput = disk_throughput()
    rows = []
    for frac in [float(x) for x in a.caps.split(",")]:
        cap = int((runtime_mib * 2**20 + frac * size) / 2**20)
        for mode in a.modes.split(","):
            out, peak = run_child(CHILD, [path, f"{cap}M", mode, a.tokens, a.selector])
            r = json.loads(out)
            r.update(frac=frac, cap=cap, mode=mode, peak=peak / 2**20)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    print(f"\n{os.path.basename(path)} ({size / 2**20:.0f} MiB), runtime {runtime_mib:.0f} MiB, cold reads, "
          f"2 threads, {a.tokens} decode tokens; cap = runtime + fraction x file\n")
    print("| cap | mode | I/O ms | mem-mgmt ms | compute ms | total ms | floor ms | MiB read/token | reads | tok/s | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['frac']:.1f} ({r['cap']} MiB) | {r['mode']} |"
        if "refused" in r:
            need = r["refused"].split("needs at least ")[1].split(" (")[0]
            print(f"{head} refused: needs {need} | | | | | | | | |")
            continue
        total = r["io_ms"] + r["mm_ms"] + r["compute_ms"]
        fl = floor_ms(r["bytes"], r["reads"], r["compute_ms"], tput)
        sel = f" ({r['selector']})" if r["mode"] == "flash" else ""
        print(f"{head[:-1]}{sel} | {r['io_ms']:.1f} | {r['mm_ms']:.1f} | {r['compute_ms']:.1f} | {total:.1f} | "
              f"{fl:.1f} | {r['bytes'] / 2**20:.2f} | {r['reads']:.0f} | {r['tps']:.1f} | {r['peak']:.0f} MiB |")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in a.modes.split(","):
            pts = [(r["cap"], r["io_ms"] + r["mm_ms"] + r["compute_ms"]) for r in rows
                   if r["mode"] == mode and "refused" not in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set_xlabel("RAM cap (MiB)")
        ax.set_ylabel("ms per token")
        ax.set_title(os.path.basename(path))
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)


if __name__ == "__main__":
    main()
