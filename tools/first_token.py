"""Time to the first token from process start, through the CLI (issue 15 item 4): seconds from launching
`gguf-flash run --no-display-prompt ARGS` until its first byte of generated text on stdout.

    python tools/first_token.py [--cache DIR] [--repeat N] -- -m smollm2 -p hi -n 4 -t 2

--cache: GGUF_FLASH_CACHE for the run (an empty folder: a first run, kernels compiled; the same folder
again: a second process, kernels loaded); the models folder and the disk probe of ~/.cache/gguf-flash
are linked in, so nothing is fetched. The kernels come from the gguf_flash that `python -m gguf_flash`
imports (PYTHONPATH picks a checkout). Prints one line per run: seconds, exit code, the run's timing line.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", help="GGUF_FLASH_CACHE for the runs (default: the environment's)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    env = dict(os.environ)
    if a.cache:
        env["GGUF_FLASH_CACHE"] = a.cache
        home = os.path.expanduser("~/.cache/gguf-flash")
        os.makedirs(a.cache, exist_ok=True)
        if not os.path.exists(os.path.join(a.cache, "models")):
            os.symlink(os.path.join(home, "models"), os.path.join(a.cache, "models"))
        if os.path.exists(os.path.join(home, "diskprobe.json")):
            shutil.copy(os.path.join(home, "diskprobe.json"), a.cache)
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "gguf_flash", "run", "--no-display-prompt", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = p.stdout.read(1)
        t = time.perf_counter() - t0
        p.stdout.read()
        err = p.stderr.read().decode(errors="replace").strip().splitlines()
        rc = p.wait()
        print(f"first token {t:.2f} s, exit {rc}{' (no output)' if not first else ''}: {err[-1] if err else ''}",
              flush=True)


if __name__ == "__main__":
    main()
