"""The runtime floor, step by step: RSS (psutil, this process) after each thing a run loads, and where
the RSS lives at the end (/proc/self/smaps by mapping).

    python tools/runtime_floor.py smollm2                        # the dense engine
    python tools/runtime_floor.py smollm2 --flash --max-ram 220M # a flash run under a cap

Each step is measured in one process, in the order `gguf-flash run` does it.
"""

import argparse
import re
import sys
from collections import defaultdict

import psutil

P = psutil.Process()
MiB = 1 << 20


def step(label, rows):
    rows.append((label, P.memory_info().rss / MiB))
    print(f"{label:52s} {rows[-1][1]:7.1f} MiB", flush=True)


def by_mapping(top=8):
    d, cur = defaultdict(int), None
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            cur = parts[5] if len(parts) > 5 else "[anonymous]"
        elif line.startswith("Rss:"):
            d[cur] += int(line.split()[1]) << 10
    return sorted(d.items(), key=lambda kv: -kv[1])[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--flash", action="store_true", help="the model's flash conversion, under --max-ram")
    ap.add_argument("--max-ram", default=None)
    ap.add_argument("--tokens", type=int, default=50)
    a = ap.parse_args()
    rows = []
    step("interpreter", rows)
    import numpy  # noqa: F401
    step("+ numpy", rows)
    import numba  # noqa: F401
    step("+ import numba (LLVM's library mapped)", rows)
    import gguf_flash
    from gguf_flash.cli import _flash_path_for
    from gguf_flash.models import resolve
    step("+ import gguf_flash", rows)
    path = _flash_path_for(a.model) if a.flash else resolve(a.model)
    llm = gguf_flash.load(path, max_ram=a.max_ram, n_ctx=256, n_threads=2)
    step("+ load (GGUF, kernels, LLVM released, tokenizer, model)", rows)
    ids = llm.tokenize("Once upon a time")
    llm.generate(ids, n_predict=a.tokens, ignore_eos=True)
    step(f"+ {len(ids)}-token prompt and {a.tokens} generated tokens", rows)
    from gguf_flash.flash.sizing import peak_rss
    print(f"{'peak RSS of the process (VmHWM)':52s} {peak_rss() / MiB:7.1f} MiB")
    if a.flash:
        print("plan:", llm.model.plan.describe())
    print("\nRSS by mapping at the end:")
    for name, b in by_mapping():
        print(f"  {b / MiB:7.1f} MiB  {name}")


if __name__ == "__main__":
    sys.exit(main())
