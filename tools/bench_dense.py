"""Dense-engine benchmark (issue 2/3): prompt tok/s (128-token prompt), decode tok/s (128 greedy steps),
peak RSS, and cold start: time to the first token of a first process that compiles every kernel (an
empty numba cache) and of a second process that loads them from numba's on-disk cache.

    python tools/bench_dense.py [smollm2 gemma3-270m ...] [--threads 2] [--skip-cold]

Each measurement runs in a fresh child process, so RSS is that of one engine. Prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
import numpy as np
import gguf_flash
path, n_threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = gguf_flash.load(path, n_ctx=512, n_threads=n_threads)
t_load = time.perf_counter() - t0
text = open('/usr/share/common-licenses/GPL-3').read()[:4000] if os.path.exists('/usr/share/common-licenses/GPL-3') else 'hello world ' * 500
ids = llm.tokenize(text)[:n_prompt]
logits = llm.model.prefill(ids[:8], 0)          # first token: includes compiling or loading kernels
t_first = time.perf_counter() - t0
llm.model.forward(int(np.argmax(logits)), 8)
t = time.perf_counter(); llm.model.prefill(ids, 0); t_prompt = time.perf_counter() - t
res = llm.generate(ids, n_predict=n_gen, ignore_eos=True)
print(json.dumps(dict(load_s=t_load, first_token_s=t_first, prompt_tps=len(ids) / t_prompt,
                      decode_tps=res.decode_tps, n_gen=len(res.tokens),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def child(path, threads, env, n_prompt=128, n_gen=128):
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads), str(n_prompt), str(n_gen)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        sys.exit(f"benchmark child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cold", action="store_true", help="skip the compile-from-scratch process")
    a = ap.parse_args()
    from gguf_flash.models import resolve
    llama_cpp = {"smollm2": (444, 154, 176), "gemma3-270m": (804, 83, 365)}  # ../shared/reference/README.md
    rows = []
    for name in a.models:
        path = resolve(name)
        cold = None
        if not a.skip_cold:
            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, GGUF_FLASH_CACHE=tmp)   # an empty numba cache: compile everything
                cold = child(path, a.threads, env, n_prompt=16, n_gen=4)["first_token_s"]
        child(path, a.threads, dict(os.environ), n_prompt=16, n_gen=4)  # make sure the cache is warm
        warm = child(path, a.threads, dict(os.environ))
        rows.append((name, warm, cold, llama_cpp.get(name)))
    print(f"\n{a.threads} threads, 128-token prompt, 128 greedy decode steps\n")
    print("| model | prompt tok/s | decode tok/s | peak RSS | first token (cached kernels) | first token (compiling) |")
    print("|---|---|---|---|---|---|")
    for name, w, cold, ref in rows:
        cold_s = f"{cold:.1f} s" if cold is not None else "-"
        print(f"| {name} (gguf-flash) | {w['prompt_tps']:.0f} | {w['decode_tps']:.1f} | {w['peak_rss_mb']:.0f} MB | "
              f"{w['first_token_s']:.2f} s | {cold_s} |")
        if ref:
            print(f"| {name} (llama.cpp) | {ref[0]} | {ref[1]} | {ref[2]} MB | | |")
            print(f"| ratio | {w['prompt_tps'] / ref[0]:.2f}x | {w['decode_tps'] / ref[1]:.2f}x | "
                  f"+{w['peak_rss_mb'] - ref[2]:.0f} MB | | |")


if __name__ == "__main__":
    main()
