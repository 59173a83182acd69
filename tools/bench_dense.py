"""Dense-engine benchmark (issue 2/3/15): prompt tok/s (128-token prompt, best of 5 per process), decode
tok/s (128 greedy steps), peak RSS, and cold start: time to the first token of a first process that
compiles the model's kernels (an empty numba cache) and of a second process that loads them from numba's
on-disk cache.

    python tools/bench_dense.py [smollm2 gemma3-270m qwen2-synthetic[-q3_k_m|-q2_k] PATH ...] [--threads 2]
                                [--rounds 3] [--skip-cold]

Each measurement runs in a fresh child process, so RSS is that of one engine. When llama-cpp-python is
installed (`pip install gguf-flash[bench]`), llama.cpp runs on the same GGUF in the same invocation (same
prompt token ids, same number of greedy steps, same threads, a child process of its own), the two engines
alternating for --rounds rounds; the table has the best of each engine and the ratio of those, with the
range of the per-round ratios beside it (this machine is noisy: quote ratios of one run). Otherwise the
stored reference figures are printed. qwen2-synthetic is Qwen2-0.5B's shape with random weights in
llama.cpp's own Q4_K_M mix (Q5_0, Q8_0, Q4_K, Q6_K), made once with llama.cpp's quantizer. Prints a
Markdown table.
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
N_PROMPT = 5                                    # the prompt is timed this many times, the best kept
llm = gguf_flash.load(path, n_ctx=512, n_threads=n_threads)
t_load = time.perf_counter() - t0
text = open('/usr/share/common-licenses/GPL-3').read()[:4000] if os.path.exists('/usr/share/common-licenses/GPL-3') else 'hello world ' * 500
ids = llm.tokenize(text)[:n_prompt]
logits = llm.model.prefill(ids[:8], 0)          # first token: includes compiling or loading kernels
t_first = time.perf_counter() - t0
llm.model.forward(int(np.argmax(logits)), 8)
t_prompt = []
for _ in range(N_PROMPT):
    t = time.perf_counter(); llm.model.prefill(ids, 0); t_prompt.append(time.perf_counter() - t)
res = llm.generate(ids, n_predict=n_gen, ignore_eos=True)
print(json.dumps(dict(load_s=t_load, first_token_s=t_first, prompt_tps=len(ids) / min(t_prompt),
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
N_PROMPT = 5
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=n_threads, n_threads_batch=n_threads, n_batch=512,
                      verbose=False)
llm.eval(ids[:8]); llm.reset()                  # warm-up: first-call allocations
t_prompt = []
for _ in range(N_PROMPT):
    t = time.perf_counter(); llm.eval(ids); t_prompt.append(time.perf_counter() - t)
    llm.reset()
llm.eval(ids)
t = time.perf_counter()
n = 0
for tok in llm.generate(ids, temp=0.0, top_k=1):   # reuses the evaluated prompt: one token per step
    n += 1
    if n >= n_gen:
        break
t_decode = time.perf_counter() - t
print(json.dumps(dict(prompt_tps=len(ids) / min(t_prompt), decode_tps=n / t_decode, n_gen=n,
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


QWEN2 = "qwen2-synthetic"   # the qwen2-0.5b shape, random weights, quantized by llama.cpp to Q4_K_M
# and the same weights in llama.cpp's low-RAM mixes (their ffn_down in Q3_K; rows of 896 fall back to Q4_0)
QWEN2_MIXES = {QWEN2: "Q4_K_M", QWEN2 + "-q3_k_m": "Q3_K_M", QWEN2 + "-q2_k": "Q2_K"}


def qwen2_synthetic(name: str = QWEN2) -> str:
    """~/.cache/gguf-flash/bench/qwen2-0.5b.q4_k_m.gguf (or the mix QWEN2_MIXES[name]): Qwen2-0.5B's shape
    with random weights, written in F16 by gguf_flash.synthetic (seeded: every mix quantizes the same
    weights) and quantized by llama.cpp's own recipe, which gives the real file's type mix (Q4_K_M: Q5_0/Q8_0
    where rows of 896 do not fit 256-wide K-blocks, Q4_K, Q6_K; Q8_0 embedding); gguf.quants cannot write
    K-quants. Needs llama-cpp-python; made once."""
    import ctypes
    from gguf_flash.models import cache_dir
    from gguf_flash.synthetic import make_spec, write_synthetic
    mix = QWEN2_MIXES[name]
    out = cache_dir("bench") / f"qwen2-0.5b.{mix.lower()}.gguf"
    if not out.exists():
        f16 = out.with_name("qwen2-0.5b.f16.gguf")
        if not f16.exists():
            write_synthetic(f16, spec=make_spec("qwen2-0.5b", qtype="F16"))
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params)):
            sys.exit(f"{f16}: llama.cpp could not quantize it to {mix}")
        tmp.rename(out)
        f16.unlink()
    return str(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"],
                    help=f"known names, paths, or {', '.join(QWEN2_MIXES)} (made with llama.cpp's quantizer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="child processes per engine, alternating")
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
        if name in QWEN2_MIXES and not live:
            sys.exit(f"{name} is made with llama.cpp's quantizer: pip install 'gguf-flash[bench]'")
        path = qwen2_synthetic(name) if name in QWEN2_MIXES else resolve(name)
        cold = None
        if not a.skip_cold:
            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, GGUF_FLASH_CACHE=tmp)   # an empty numba cache: compile everything
                cold = child(path, a.threads, env, n_prompt=16, n_gen=4)["first_token_s"]
        child(path, a.threads, dict(os.environ), n_prompt=16, n_gen=4)  # make sure the cache is warm
        ours, theirs = [], []
        for _ in range(a.rounds):   # alternate, so both see the same stretch of a noisy machine
            ours.append(child(path, a.threads, dict(os.environ)))
            if live:
                theirs.append(llama_child(path, a.threads))
        rows.append((name, ours, cold, theirs if live else None, stored.get(name)))
    print(f"\n{a.threads} threads, 128-token prompt (best of 5 per process), 128 greedy decode steps, "
          f"{a.rounds} processes per engine alternating; the best of them; llama.cpp: "
          + ("measured in this run (llama-cpp-python " + _llama_version() + ")" if live
             else "stored reference figures, not this run") + "\n")
    print("| model | prompt tok/s | decode tok/s | peak RSS | first token (cached kernels) | first token (compiling) |")
    print("|---|---|---|---|---|---|")
    best = lambda runs, k: max(r[k] for r in runs)  # noqa: E731
    for name, ours, cold, theirs, stored_ref in rows:
        cold_s = f"{cold:.1f} s" if cold is not None else "-"
        pp, tg = best(ours, "prompt_tps"), best(ours, "decode_tps")
        rss = min(r["peak_rss_mb"] for r in ours)
        print(f"| {name} (gguf-flash) | {pp:.0f} | {tg:.1f} | {rss:.0f} MB | "
              f"{min(r['first_token_s'] for r in ours):.2f} s | {cold_s} |")
        ref = ((best(theirs, "prompt_tps"), best(theirs, "decode_tps"), min(r["peak_rss_mb"] for r in theirs))
               if theirs else stored_ref)
        if ref:
            print(f"| {name} (llama.cpp) | {ref[0]:.0f} | {ref[1]:.1f} | {ref[2]:.0f} MB | | |")
            spread = ""
            if theirs:   # the ratio within each round, to show the noise
                rp = [o["prompt_tps"] / t["prompt_tps"] for o, t in zip(ours, theirs)]
                rd = [o["decode_tps"] / t["decode_tps"] for o, t in zip(ours, theirs)]
                spread = f" (rounds {min(rp):.2f}-{max(rp):.2f}x / {min(rd):.2f}-{max(rd):.2f}x)"
            print(f"| ratio{spread} | {pp / ref[0]:.2f}x | {tg / ref[1]:.2f}x | {rss - ref[2]:+.0f} MB | | |")


def _llama_version() -> str:
    from importlib.metadata import version
    return version("llama-cpp-python")


if __name__ == "__main__":
    main()
