"""Prompt processing benchmark: prompt tok/s of the dense engine, and of naive and flash mode at RAM caps,
with the prompt in chunks (the product) and token by token (one forward per prompt token, the head only
for the last: what flash mode did before chunks), cold reads, each run a fresh child process.

    python tools/bench_prompt.py MODEL.flash.gguf [--source MODEL.gguf] [--caps d-0.4,d0.9]
                                 [--modes naive,flash] [--tokens 256] [--no-by-token]

Caps as in tools/bench_flash.py (min, dN = N x the dense engine's peak RSS, d-N = that peak - N x the
source file, fN = N x the flash file). Ratios are from one invocation (the machine is noisy).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_flash import model_paths, resolve_cap, run_child  # noqa: E402

TEXT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
        "combined movable metal type, oil-based ink and a wooden press adapted from wine making. Within "
        "fifty years printers worked in more than two hundred towns, and the price of books fell sharply. ")

CHILD = r"""
import json, sys, time
import numpy as np
import gguf_flash
from gguf_flash.errors import RamCapError
path, cap, mode, n_tok, by_token, text = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6]
kw = dict(n_ctx=n_tok + 64, n_threads=2)
if mode != "engine":
    kw.update(max_ram=None if cap == "none" else cap, mode=mode, cold=True)
try:
    llm = gguf_flash.load(path, **kw)
except RamCapError as e:
    print(json.dumps({"refused": str(e)})); sys.exit(0)
ids = (llm.tokenize(text * 40))[:n_tok]
m = llm.model
m.prefill(ids[:4], 0)                     # first call: buffers touched, kernels loaded
if mode != "engine":
    m.prompt_stats.clear(); m.stats.clear()
t = time.perf_counter()
if by_token:
    for i, tok in enumerate(ids):
        m.forward(tok, i, logits=i == len(ids) - 1)
    st = m.stats
else:
    m.prefill(ids, 0)
    st = getattr(m, "prompt_stats", [])
dt = time.perf_counter() - t
out = dict(tps=len(ids) / dt, n=len(ids))
if st:
    out.update(io_ms=sum(s.io_ms for s in st), mm_ms=sum(s.mm_ms for s in st),
               compute_ms=sum(s.compute_ms for s in st), mib=sum(s.bytes_read for s in st) / 2**20,
               reads=sum(s.read_calls for s in st), selector=m.selector)
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--source", default=None)
    ap.add_argument("--caps", default="d-0.4,d0.9")
    ap.add_argument("--modes", default="naive,flash")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--no-by-token", action="store_true", help="skip the token-by-token runs")
    a = ap.parse_args()
    path, source = model_paths(a.model, a.source)
    src_size, size = os.path.getsize(source), os.path.getsize(path)
    out, dense_peak = run_child(CHILD, [source, "none", "engine", a.tokens, "0", TEXT])
    dense = json.loads(out)
    rows = []
    for spec in a.caps.split(","):
        for mode in a.modes.split(","):
            cap = int(float(spec[1:]) * size / 2**20) if spec.startswith("f") else \
                resolve_cap(spec, path, mode, dense_peak, src_size)
            if cap is None:
                continue
            for by_token in ([False] if a.no_by_token else [False, True]):
                o, peak = run_child(CHILD, [path, f"{cap}M", mode, a.tokens, "1" if by_token else "0", TEXT])
                r = json.loads(o)
                r.update(spec=spec, cap=cap, mode=mode, by_token=by_token, peak=peak / 2**20)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr)
    print(f"\n{os.path.basename(path)}: a {dense['n']}-token prompt, cold reads, 2 threads. Dense engine on the "
          f"source: {dense['tps']:.0f} tok/s, peak RSS {dense_peak / 2**20:.0f} MiB\n")
    print("| cap | mode | prompt | tok/s | x dense engine | x token by token | I/O ms | compute ms | MiB read | reads | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['cap']} MiB = {r['cap'] * 2**20 / dense_peak:.2f} x dense ({r['spec']}) | {r['mode']} |"
        if "refused" in r:
            print(f"{head} refused | | | | | | | | |")
            continue
        tbt = next((q for q in rows if q["cap"] == r["cap"] and q["mode"] == r["mode"] and q["by_token"]
                    and "tps" in q), None)
        ratio = f"{r['tps'] / tbt['tps']:.1f}" if tbt and not r["by_token"] else ""
        kind = "token by token" if r["by_token"] else "chunks"
        sel = f" ({r['selector']})" if r["mode"] == "flash" and "selector" in r else ""
        print(f"{head[:-1]}{sel} | {kind} | {r['tps']:.1f} | {r['tps'] / dense['tps']:.2f} | {ratio} | "
              f"{r.get('io_ms', 0):.0f} | {r.get('compute_ms', 0):.0f} | {r.get('mib', 0):.0f} | "
              f"{r.get('reads', 0):.0f} | {r['peak']:.0f} MiB |")


if __name__ == "__main__":
    main()
