"""Flash decode step against the dense engine with everything resident (issue 15's compute target):
flash compute per token at most dense x (active fraction + 0.15).

    python tools/bench_step.py SOURCE FLASH [--tokens 48] [--threads 2] [--selectors gate,product,bundle]
                               [--rounds 1] [--split]

SOURCE is the GGUF the flash file was converted from (a path or a known name: smollm2, gemma3-270m).
One process, interleaved: the dense engine, then flash mode with no cap (every bundle the window can
hold stays) once per selector, then the dense engine again; the same prompt, greedy, median ms per
decoded token. --rounds R repeats the selectors and the dense engine R times with every model loaded
once, so each ratio is taken R times within seconds of its own dense runs: the machine's speed drifts
by 10-20% between processes and over minutes, more than most changes measured here. Flash "compute"
is its time minus reading and window bookkeeping (TokenStats); after the prompt the window already
holds most rows, so it is the step's arithmetic and glue. Prints a Markdown table; quote ratios from
one run (the machine is noisy).

--split: also where a step's time goes inside the decode loop (not each part alone and hot). The dense
step is run as its per-layer compiled calls from Python (attention_layer, ffn_layer_dense, then
output_head: the calls forward_token makes in one), the flash step with its compiled calls timed where
the runtime makes them (flashstep.layer_select, the FFN's run_layer with its layer_ffn, the head); a
token that reads nothing and takes every row (bundle rows, all held) is one call over the layers in the
table above (flashstep.layers_held), and the split times it as these per-layer calls.
"""

import argparse
import time
from collections import defaultdict

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


def _timed(obj, name, parts, key):
    """Replace obj.name by a wrapper that adds its wall time to parts[key]."""
    f = getattr(obj, name)

    def wrapper(*args):
        t0 = time.perf_counter()
        r = f(*args)
        parts[key] += time.perf_counter() - t0
        return r
    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, f)


def dense_split(model, toks, n) -> dict:
    """ms per token of the dense step's parts, its per-layer compiled calls made from Python."""
    from gguf_flash.kernels import forward as fw, nn
    w, s, parts = model.w, model.st, defaultdict(float)

    def step(token, pos):
        fw.embed(s.x, w.blob, w.embd, token, w.fp[fw.FP_EMBD_SCALE], w.ts)
        nn.rope_cos_sin(s.cos[0], s.sin[0], pos, w.inv_freq[0])
        nn.rope_cos_sin(s.cos[1], s.sin[1], pos, w.inv_freq[1])
        for il in range(model.cfg.n_layer):
            t0 = time.perf_counter()
            fw.attention_layer(s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.k_cache, s.v_cache, s.cos, s.sin,
                               s.xq_embd, s.xq_q, w.blob, w.mats, w.norms, w.qk_norms, w.biases, w.swa, w.ip,
                               w.fp, il, pos, w.ts)
            t1 = time.perf_counter()
            fw.ffn_layer_dense(s.x, s.xb, s.hg, s.hu, s.xq_embd, s.xq_ff, w.blob, w.mats, w.norms, w.ip, w.fp, il,
                               w.thresholds[il], w.ts)
            parts["attention (+ selection)"] += t1 - t0
            parts["FFN"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        fw.output_head(s.logits, s.x, s.xb, s.xq_embd, w.blob, w.output, w.output_norm, w.fp[fw.FP_EPS], w.ts)
        parts["head"] += time.perf_counter() - t0
        return s.logits

    for i, t in enumerate(toks):
        model.forward(t, i)
    t, pos = toks[-1], len(toks)
    step(t, pos)
    parts.clear()
    t0 = time.perf_counter()
    for _ in range(n):
        t, pos = int(np.argmax(step(t, pos))), pos + 1
    parts["step"] = time.perf_counter() - t0
    return {k: v / n * 1e3 for k, v in parts.items()}


def flash_split(llm, toks, n) -> dict:
    """ms per token of the flash step's parts, timed where the runtime makes its calls."""
    from gguf_flash.kernels import flashstep
    m, parts = llm.model, defaultdict(float)
    m._held = lambda: None   # the per-layer calls even where a token could be one (flashstep.layers_held)
    for i, t in enumerate(toks):
        m.forward(t, i)
    undo = [_timed(flashstep, "layer_select", parts, "attention (+ selection)"),
            _timed(m.ffn, "run_layer", parts, "FFN"),
            _timed(flashstep, "layer_ffn", parts, "FFN: its compiled call"),
            _timed(m, "decode_head", parts, "head")]
    try:
        t, pos = toks[-1], len(toks)
        t0 = time.perf_counter()
        for _ in range(n):
            t, pos = int(np.argmax(m.forward(t, pos))), pos + 1
        parts["step"] = time.perf_counter() - t0
    finally:
        for u in undo:
            u()
    return {k: v / n * 1e3 for k, v in parts.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("flash")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--selectors", default="gate,product,bundle")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat dense, each selector, ... this many times in the one process (every model "
                         "loaded once) and give each ratio's median and range over the rounds")
    ap.add_argument("--split", action="store_true", help="also the parts of each step inside the loop")
    a = ap.parse_args()
    import gguf_flash
    from gguf_flash.models import resolve

    sels = a.selectors.split(",")
    dense_llm = gguf_flash.load(resolve(a.source), n_threads=a.threads)
    flash_llm = {sel: gguf_flash.load(a.flash, selector=sel, n_threads=a.threads) for sel in sels}

    def dense():
        return _decode(dense_llm.model, dense_llm.tokenize(PROMPT), a.tokens)

    def flash(sel):
        m = flash_llm[sel].model
        total, cpu = _decode(m, flash_llm[sel].tokenize(PROMPT), a.tokens)
        st = m.stats[-a.tokens:]
        comp = float(np.median([s.compute_ms for s in st]))
        active = float(np.mean([s.active for s in st])) / (m.cfg.n_layer * m.cfg.n_ff)
        return total, comp, cpu, active

    # dense, the selectors, dense, the selectors, ..., dense: each round's target is the mean of the dense
    # runs before and after it
    dense_runs, runs = [dense()], {sel: [] for sel in sels}
    for _ in range(a.rounds):
        for sel in sels:
            runs[sel].append(flash(sel))
        dense_runs.append(dense())
    splits = {}
    if a.split:
        splits["dense"] = dense_split(dense_llm.model, dense_llm.tokenize(PROMPT), a.tokens)
        for sel in sels:
            llm = gguf_flash.load(a.flash, selector=sel, n_threads=a.threads)   # fresh: flash_split patches it
            splits[sel] = flash_split(llm, llm.tokenize(PROMPT), a.tokens)
            del llm
    rounds = (f", {a.rounds} rounds (each cell the median over the rounds, the range in brackets)"
              if a.rounds > 1 else "")
    print(f"dense engine: {' / '.join(f'{d:.2f}' for d, _ in dense_runs)} ms per token (runs in order), CPU "
          f"{' / '.join(f'{c:.2f}' for _, c in dense_runs)} ms, {a.threads} threads{rounds}")
    print("| selector | flash ms/token | compute ms | CPU ms | active | target: dense x (active + 0.15) | "
          "compute / target | CPU / dense CPU x (active + 0.15) |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(v, fmt):
        v = np.array(v)
        return fmt.format(np.median(v)) + (f" ({fmt.format(v.min())}-{fmt.format(v.max())})" if len(v) > 1 else "")

    for sel in sels:
        total, comp, cpu, active, target, ratio, cratio = ([] for _ in range(7))
        for r, (t, c, u, act) in enumerate(runs[sel]):
            share = act + 0.15
            d = (dense_runs[r][0] + dense_runs[r + 1][0]) / 2        # the dense runs before and after it
            dc = (dense_runs[r][1] + dense_runs[r + 1][1]) / 2
            total.append(t), comp.append(c), cpu.append(u), active.append(act)
            target.append(d * share), ratio.append(c / (d * share)), cratio.append(u / (dc * share))
        cells = " | ".join(cell(v, "{:.2f}") for v in (total, comp, cpu))
        print(f"| {sel} | {cells} | {np.mean(active):.1%} | {cell(target, '{:.2f}')} | {cell(ratio, '{:.2f}')} | "
              f"{cell(cratio, '{:.2f}')} |")
    if splits:
        names = list(splits)
        print(f"\nInside the decode loop, ms per token ({a.tokens} tokens, the calls timed from Python):\n")
        print("| part | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for part in ("attention (+ selection)", "FFN", "FFN: its compiled call", "head", "step"):
            print(f"| {part} | " + " | ".join(f"{splits[k][part]:.2f}" if part in splits[k] else "" for k in names)
                  + " |")


if __name__ == "__main__":
    main()
