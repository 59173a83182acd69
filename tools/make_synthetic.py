#!/usr/bin/env python3
"""Write a synthetic (random-weight) GGUF model: tiny ones for tests, real-sized ones for benchmarks.

  python tools/make_synthetic.py OUT.gguf --shape tinyllama-1.1b --qtype Q4_0 [--hot-alpha 1.0]
  python tools/make_synthetic.py OUT.gguf --arch qwen3 --n-layer 2 --n-embd 64 --n-ff 128

Shapes: see gguf_flash.synthetic.SHAPES. Any explicit option overrides the shape's value.
"""

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gguf_flash.errors import GGUFFlashError  # noqa: E402
from gguf_flash.synthetic import ARCHES, QTYPES, SHAPES, make_spec, write_synthetic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), help="named model shape (default: tiny)")
    p.add_argument("--arch", choices=ARCHES)
    p.add_argument("--qtype", choices=sorted(QTYPES), help="type of the 2-D weights (default Q8_0)")
    p.add_argument("--embd-qtype", choices=sorted(QTYPES), help="type of token_embd/output (default: qtype)")
    p.add_argument("--hot-alpha", type=float, help="power-law exponent of hot FFN neurons")
    p.add_argument("--activation", choices=["silu", "gelu", "relu"])
    p.add_argument("--tokenizer", choices=["gpt2", "llama"])
    p.add_argument("--untied", action="store_true", help="write a separate output.weight")
    for dim in ("n-layer", "n-embd", "n-ff", "n-head", "n-head-kv", "head-dim", "n-vocab", "n-ctx",
                "sliding-window", "seed"):
        p.add_argument(f"--{dim}", type=int)
    p.add_argument("--rope-freq-base", type=float)
    a = p.parse_args(argv)
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the temporary file is removed (gguf_flash/atomic.py)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        spec = make_spec(a.shape or "tiny", arch=a.arch, qtype=a.qtype, embd_qtype=a.embd_qtype,
                         hot_alpha=a.hot_alpha, activation=a.activation, tokenizer=a.tokenizer,
                         tied=False if a.untied else None, n_layer=a.n_layer, n_embd=a.n_embd,
                         n_ff=a.n_ff, n_head=a.n_head, n_head_kv=a.n_head_kv, head_dim=a.head_dim,
                         n_vocab=a.n_vocab, n_ctx=a.n_ctx, sliding_window=a.sliding_window,
                         seed=a.seed, rope_freq_base=a.rope_freq_base)
        t0 = time.perf_counter()

        def progress(name, i, n):
            print(f"\r[{i + 1}/{n}] {name:<40}", end="", file=sys.stderr, flush=True)

        path = write_synthetic(a.out, spec=spec, progress=progress)
    except GGUFFlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"\nwrote {path}: {spec.arch} {spec.qtype}, {size / 2**20:.1f} MiB in {dt:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
