"""Dense-engine benchmark (issue 2/3): prompt tok/s (128-token prompt), decode tok/s (128 greedy steps),
peak RSS, and cold start: time to the first token of a first process that compiles the model's kernels
(an empty numba cache) and of a second process that loads them from numba's on-disk cache.

    python tools/bench_dense.py [smollm2 gemma3-270m ...] [--threads 2] [--skip-cold]

Each measurement runs in a fresh child process, so RSS is that of one engine. When llama-cpp-python is
installed (`pip install gguf-flash[bench]`), llama.cpp runs on the same GGUF in the same invocation (same
prompt, same number of greedy steps, same threads, a child process of its own) and the ratios are of
this run; otherwise the stored reference figures are printed. Prints a Markdown table.
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


# llama.cpp through llama-cpp-python, measured like CHILD: the same GPL-3 prompt cut to n_prompt tokens
# (our tokenizer's ids: both tokenize alike, tests/test_dense_reference.py), a prompt timed alone, then
# n_gen greedy tokens, peak RSS of its own process
LLAMA_CHILD = r"""
import json, os, resource, sys, time
import llama_cpp
path, n_threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = json.loads(sys.argv[5])
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=n_threads, n_threads_batch=n_threads, n_batch=512,
                      verbose=False)
llm.eval(ids[:8]); llm.reset()                  # warm-up: first-call allocations
t = time.perf_counter(); llm.eval(ids); t_prompt = time.perf_counter() - t
llm.reset()
llm.eval(ids)
t = time.perf_counter()
n = 0
for tok in llm.generate(ids, temp=0.0, top_k=1):   # reuses the evaluated prompt: one token per step
    n += 1
    if n >= n_gen:
        break
t_decode = time.perf_counter() - t
print(json.dumps(dict(prompt_tps=len(ids) / t_prompt, decode_tps=n / t_decode, n_gen=n,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""

IDS = r"""
import json, os, sys
import gguf_flash
llm = gguf_flash.load(sys.argv[1], n_ctx=512)
text = open('/usr/share/common-licenses/GPL-3').read()[:4000] if os.path.exists('/usr/share/common-licenses/GPL-3') else 'hello world ' * 500
print(json.dumps(llm.tokenize(text)[:int(sys.argv[2])]))
"""


def llama_cpp_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def llama_child(path, threads, n_prompt=128, n_gen=128):
    ids = subprocess.run([sys.executable, "-c", IDS, str(path), str(n_prompt)], capture_output=True, text=True,
                         timeout=600)
    if ids.returncode:
        sys.exit(f"tokenizing the prompt failed: {ids.stderr.strip().splitlines()[-1:]}")
    out = subprocess.run([sys.executable, "-c", LLAMA_CHILD, str(path), str(threads), str(n_prompt), str(n_gen),
                          ids.stdout.strip()], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        sys.exit(f"llama.cpp benchmark child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    stored = {"smollm2": (444, 154, 176), "gemma3-270m": (804, 83, 365)}  # ../shared/reference/README.md
    live = llama_cpp_available()
    if not live:
        print("llama_cpp does not import: llama.cpp's stored reference figures (ratios across runs); "
              "pip install 'gguf-flash[bench]' to measure it in this run", file=sys.stderr)
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
        if live:
            r = llama_child(path, a.threads)
            ref = (r["prompt_tps"], r["decode_tps"], r["peak_rss_mb"])
        else:
            ref = stored.get(name)
        rows.append((name, warm, cold, ref))
    print(f"\n{a.threads} threads, 128-token prompt, 128 greedy decode steps; llama.cpp: "
          + ("measured in this run (llama-cpp-python " + _llama_version() + ")" if live
             else "stored reference figures, not this run") + "\n")
    print("| model | prompt tok/s | decode tok/s | peak RSS | first token (cached kernels) | first token (compiling) |")
    print("|---|---|---|---|---|---|")
    for name, w, cold, ref in rows:
        cold_s = f"{cold:.1f} s" if cold is not None else "-"
        print(f"| {name} (gguf-flash) | {w['prompt_tps']:.0f} | {w['decode_tps']:.1f} | {w['peak_rss_mb']:.0f} MB | "
              f"{w['first_token_s']:.2f} s | {cold_s} |")
        if ref:
            print(f"| {name} (llama.cpp) | {ref[0]:.0f} | {ref[1]:.1f} | {ref[2]:.0f} MB | | |")
            print(f"| ratio | {w['prompt_tps'] / ref[0]:.2f}x | {w['decode_tps'] / ref[1]:.2f}x | "
                  f"+{w['peak_rss_mb'] - ref[2]:.0f} MB | | |")


def _llama_version() -> str:
    from importlib.metadata import version
    return version("llama-cpp-python")


if __name__ == "__main__":
    main()
