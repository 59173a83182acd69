"""Install to first token on a fresh machine, as README's first command does it (issue 15 item 4).

    python tools/fresh_install.py [--dir /var/tmp/gguf-flash-fresh] [--model smollm2] [--log FILE]

Clones this checkout's HEAD, makes an empty venv and runs, in a pseudo-terminal (so every progress line
shows as a user sees it), with empty pip, model and kernel caches:

    cd CLONE && python3 -m pip install . && gguf-flash run -m MODEL -p "The capital of France is" -n 32 --temp 0

Prints when each phase's first line appeared (seconds from the start): pip's install, the model's
download, the kernels' compiling, the prompt echoed, the first generated token; and the longest
stretch with nothing new on the terminal. Needs the network to PyPI; nothing else is touched.
"""

import argparse
import os
import pty
import re
import shutil
import subprocess
import sys
import time

PROMPT = "The capital of France is"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp/gguf-flash-fresh")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--log", help="write every terminal line with its time here")
    a = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = a.dir
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(f"{root}/home")
    subprocess.run(["git", "clone", "-q", repo, f"{root}/src"], check=True)
    subprocess.run([sys.executable, "-m", "venv", f"{root}/venv"], check=True)
    env = dict(os.environ, PATH=f"{root}/venv/bin:" + os.environ["PATH"], GGUF_FLASH_CACHE=f"{root}/cache",
               PIP_NO_CACHE_DIR="1", HOME=f"{root}/home", TERM="xterm", COLUMNS="100")
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "NUMBA_CACHE_DIR"):
        env.pop(k, None)
    cmd = (f'cd {root}/src && python3 -m pip install . && gguf-flash run -m {a.model} -p "{PROMPT}" '
           f'-n 32 --temp 0')
    lines = []                                     # (seconds, text) of every line the terminal showed
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("bash", ["bash", "-c", cmd], env)
    while True:
        try:
            d = os.read(fd, 4096)
        except OSError:
            break
        if not d:
            break
        t = time.perf_counter() - t0
        for part in re.split(rb"[\r\n]", ANSI.sub(b"", d)):
            s = part.decode(errors="replace").strip()
            if s:
                lines.append((t, s))
    _, status = os.waitpid(pid, 0)
    total = time.perf_counter() - t0
    if a.log:
        with open(a.log, "w") as fh:
            fh.writelines(f"{t:7.1f} {s}\n" for t, s in lines)

    def first(pred):
        return next((t for t, s in lines if pred(s)), None)

    marks = [("pip install", first(lambda s: s.startswith("Processing "))),
             ("installed", first(lambda s: s.startswith("Successfully installed"))),
             ("model download", first(lambda s: s.startswith("gguf-flash: fetching"))),
             ("compiling kernels", first(lambda s: s.startswith("gguf-flash: compiling"))),
             ("kernels compiled", first(lambda s: "kernels compiled in" in s)),
             ("prompt echoed", first(lambda s: s.startswith(PROMPT)))]
    echo = marks[-1][1]
    gen = next((t for t, s in lines if echo is not None and t >= echo and s != PROMPT), None)
    marks.append(("first generated text", gen))
    times = [0.0] + [t for t, _ in lines] + [total]
    gap = max((b - a_, a_) for a_, b in zip(times, times[1:]))
    print(f"exit status {os.waitstatus_to_exitcode(status)}, {total:.1f} s in all")
    for name, t in marks:
        print(f"  {name:22s} {'-' if t is None else f'{t:6.1f} s'}")
    print(f"  longest silence        {gap[0]:6.1f} s (from {gap[1]:.1f} s)")
    print(f"  last line: {lines[-1][1] if lines else ''}")


if __name__ == "__main__":
    main()
