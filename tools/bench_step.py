"""Flash decode step against the dense engine with everything resident (issue 15's compute target):
flash compute per token at most dense x (active fraction + 0.15).

    python tools/bench_step.py SOURCE FLASH [--tokens 48] [--threads 2] [--selectors gate,product,bundle]

SOURCE is the GGUF the flash file was converted from (a path or a known name: smollm2, gemma3-270m).
One process, interleaved: the dense engine, then flash mode with no cap (every bundle the window can
hold stays) once per selector, then the dense engine again; the same prompt, greedy, median ms per
decoded token. Flash "compute" is its time minus reading and window bookkeeping (TokenStats); after
the prompt the window already holds most rows, so it is the step's arithmetic and glue. Prints a
Markdown table; quote ratios from one run (the machine is noisy).
"""

import argparse
import time

import numpy as np

PROMPT = "The history of the Roman empire is a long story of"


def _decode(model, toks, n):
    """(median wall ms, mean process CPU ms) per token of n greedy steps after the prompt. CPU time
    counts every thread of this process and not the others': on a shared machine it moves much less
    than wall time (with one thread it is the step's own work)."""
    for i, t in enumerate(toks):
        model.forward(t, i)
    t, pos, times = toks[-1], len(toks), []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        lg = model.forward(t, pos)
        times.append(time.perf_counter() - t0)
        t, pos = int(np.argmax(lg)), pos + 1
    return float(np.median(times) * 1e3), (time.process_time() - c0) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("flash")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--selectors", default="gate,product,bundle")
    a = ap.parse_args()
    import gguf_flash
    from gguf_flash.models import resolve

    def dense():
        llm = gguf_flash.load(resolve(a.source), n_threads=a.threads)
        return _decode(llm.model, llm.tokenize(PROMPT), a.tokens)

    (d0, c0) = dense()
    rows = []
    for sel in a.selectors.split(","):
        llm = gguf_flash.load(a.flash, selector=sel, n_threads=a.threads)
        m = llm.model
        total, cpu = _decode(m, llm.tokenize(PROMPT), a.tokens)
        st = m.stats[-a.tokens:]
        comp = float(np.median([s.compute_ms for s in st]))
        active = float(np.mean([s.active for s in st])) / (m.cfg.n_layer * m.cfg.n_ff)
        rows.append((sel, total, comp, cpu, active))
        del llm, m
    d1, c1 = dense()
    d, dc = (d0 + d1) / 2, (c0 + c1) / 2
    print(f"dense engine: {d0:.2f} / {d1:.2f} ms per token (before / after), CPU {c0:.2f} / {c1:.2f} ms, "
          f"{a.threads} threads")
    print("| selector | flash ms/token | compute ms | CPU ms | active | target: dense x (active + 0.15) | "
          "compute / target | CPU / dense CPU x (active + 0.15) |")
    print("|---|---|---|---|---|---|---|---|")
    for sel, total, comp, cpu, active in rows:
        target = d * (active + 0.15)
        print(f"| {sel} | {total:.2f} | {comp:.2f} | {cpu:.2f} | {active:.1%} | {target:.2f} | {comp / target:.2f} | "
              f"{cpu / (dc * (active + 0.15)):.2f} |")


if __name__ == "__main__":
    main()
