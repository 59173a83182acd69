"""Converter benchmark (issue 4): wall time per phase and peak RSS of `gguf-flash convert`, each model in a
fresh child process, against the targets (SmolLM2 at most 90 s on 2 cores; peak RSS at most 0.7x the source
on the TinyLlama shape, under 1.5 GiB on the 7B shape).

    python tools/bench_convert.py [smollm2 gemma3-270m PATH.gguf ...] [--cold] [--calib-tokens N]
        [--max-ram SIZE] [--sparsity S] [--predictor auto|always|never] [--no-head-index]

--cold gives the child an empty numba cache, so the time includes compiling every kernel (a fresh clone's
first conversion). Peak RSS is sampled from outside every 20 ms (psutil, the child's resident set: its
file-mapped pages too); beside it, the peak of each phase (calibrate / sparsity / head index / predictors
/ write) as the converter samples it in-process every 10 ms. Prints a Markdown table.
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
rep = gguf_flash.convert(sys.argv[1], sys.argv[2], force=True, **json.loads(sys.argv[3]))
import os
print(json.dumps(dict(seconds=time.perf_counter() - t0, phases=rep.phases, peak_rss_mb=rep.peak_rss_mb,
                      phase_peak=rep.phase_peak_mb,
                      sparsity=rep.sparsity, prod_sparsity=rep.prod_sparsity, ranks=[min(rep.ranks), max(rep.ranks)],
                      out_bytes=os.path.getsize(sys.argv[2]))))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--cold", action="store_true", help="empty numba cache: include compiling the kernels")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--max-ram", default=None, help="convert --max-ram (e.g. 1.5G)")
    ap.add_argument("--sparsity", type=float, default=None, help="convert --sparsity (skips the search)")
    ap.add_argument("--predictor", default="auto", choices=("auto", "always", "never"))
    ap.add_argument("--no-head-index", action="store_true")
    a = ap.parse_args()
    from gguf_flash.models import resolve
    kw = dict(calib_tokens=a.calib_tokens, max_ram=a.max_ram, sparsity=a.sparsity, predictor=a.predictor,
              head_index=not a.no_head_index)
    print("| model | source | flash file | total s | calibrate | sparsity curves | head index | predictors | write | "
          "sparsity gate / product | peak RSS (outside) | by phase (in-process) | peak / source |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        src = resolve(name)
        size = os.path.getsize(src)
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, GGUF_FLASH_CACHE=tmp) if a.cold else dict(os.environ)
            rc, stdout, stderr, peak = sampled([sys.executable, "-c", CHILD, src, os.path.join(tmp, "out.flash.gguf"),
                                                json.dumps(kw)], env)
        if rc:
            sys.exit(f"{name}: conversion failed: {stderr.strip().splitlines()[-1:]}")
        r = json.loads(stdout.strip().splitlines()[-1])
        ph = r["phases"]
        print(f"| {os.path.basename(name)} | {size / 2**20:.0f} MiB | {r['out_bytes'] / 2**20:.0f} MiB "
              f"({r['out_bytes'] / size:.2f}x) | {r['seconds']:.0f} | {ph['calibrate']:.0f} | {ph['sparsity']:.0f} | "
              f"{ph.get('head index', 0):.0f} | {ph['predictors']:.0f} | {ph['write']:.0f} | "
              f"{r['sparsity']:.2f} / {r['prod_sparsity']:.2f} | {peak / 2**20:.0f} MiB | "
              f"{' / '.join(f'{v:.0f}' for v in r['phase_peak'].values())} | "
              f"{peak / size:.2f}x |", flush=True)


def sampled(cmd, env):
    """(returncode, stdout, stderr, peak RSS bytes sampled every 20 ms from outside)."""
    from gguf_flash.flash.budget import sample_peak_rss
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        peak = sample_peak_rss(p, every=0.02)
        p.wait()
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read(), err.read(), peak


if __name__ == "__main__":
    main()
