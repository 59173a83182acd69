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
print(json.dumps(dict(seconds=time.perf_counter() - t0, phases=rep.phases, peak_rss_mb=rep.peak_rss_mb,
                      sparsity=rep.sparsity, ranks=[min(rep.ranks), max(rep.ranks)])))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--cold", action="store_true", help="empty numba cache: include compiling the kernels")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    a = ap.parse_args()
    from gguf_flash.models import resolve
    print("| model | source | total s | calibrate | sparsity | predictors | write | peak RSS | RSS target |")
    print("|---|---|---|---|---|---|---|---|---|")
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
        target = (size + 600e6) / 2**20
        print(f"| {os.path.basename(name)} | {size / 2**20:.0f} MiB | {r['seconds']:.0f} | {ph['calibrate']:.0f} | "
              f"{ph['sparsity']:.0f} | {ph['predictors']:.0f} | {ph['write']:.0f} | {r['peak_rss_mb']:.0f} MiB | "
              f"{target:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
