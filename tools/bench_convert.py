"""Converter benchmark (issue 4): wall time per phase and peak RSS of `gguf-flash convert`, each model in a
fresh child process, against the targets (SmolLM2 at most 180 s on 2 cores; peak RSS at most the source
file's size + 600 MB).

    python tools/bench_convert.py [smollm2 gemma3-270m PATH.gguf ...] [--cold] [--calib-tokens N]

--cold gives the child an empty numba cache, so the time includes compiling every kernel (a fresh clone's
first conversion). Peak RSS is the child's ru_maxrss. Prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import gguf_flash
rep = gguf_flash.convert(sys.argv[1], sys.argv[2], force=True, calib_tokens=int(sys.argv[3]))
import os
print(json.dumps(dict(seconds=time.perf_counter() - t0, phases=rep.phases, peak_rss_mb=rep.peak_rss_mb,
                      sparsity=rep.sparsity, prod_sparsity=rep.prod_sparsity, ranks=[min(rep.ranks), max(rep.ranks)],
                      out_bytes=os.path.getsize(sys.argv[2]))))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--cold", action="store_true", help="empty numba cache: include compiling the kernels")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    a = ap.parse_args()
    from gguf_flash.models import resolve
    print("| model | source | flash file | total s | calibrate | sparsity curves | head index | predictors | write | "
          "sparsity gate / product | peak RSS | peak / source |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        src = resolve(name)
        size = os.path.getsize(src)
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, GGUF_FLASH_CACHE=tmp) if a.cold else dict(os.environ)
            out = subprocess.run([sys.executable, "-c", CHILD, src, os.path.join(tmp, "out.flash.gguf"),
                                  str(a.calib_tokens)],
                                 capture_output=True, text=True, env=env, timeout=7200)
        if out.returncode:
            sys.exit(f"{name}: conversion failed: {out.stderr.strip().splitlines()[-1:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ph = r["phases"]
        print(f"| {os.path.basename(name)} | {size / 2**20:.0f} MiB | {r['out_bytes'] / 2**20:.0f} MiB "
              f"({r['out_bytes'] / size:.2f}x) | {r['seconds']:.0f} | {ph['calibrate']:.0f} | {ph['sparsity']:.0f} | "
              f"{ph.get('head index', 0):.0f} | {ph['predictors']:.0f} | {ph['write']:.0f} | "
              f"{r['sparsity']:.2f} / {r['prod_sparsity']:.2f} | {r['peak_rss_mb']:.0f} MiB | "
              f"{r['peak_rss_mb'] * 2**20 / size:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
