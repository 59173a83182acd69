"""Issue 13's sparsity table, remeasured by the method it names: the float64 reference forward of
tests/reference_forward.py, held-out `pydoc_data.topics` text, the same sparsity in every layer.

    python tools/bench_ref_sparsity.py MODEL [--sparsity 0.2,0.3,0.4,0.5] [--train-chunks 2]

MODEL: a GGUF path or a known name (smollm2, gemma3-270m). The text is cut as the converter cuts it
(flash/calibrate.py: chunks of 512 tokens, BOS per chunk where the model adds one, 8 chunks, the last 2
held out). Per layer, thresholds are quantiles over the first --train-chunks chunks' dense FFN
activations; each column then drops that share of neurons in every layer:

- gate, threshold: |act(g_i)| <= t_l dropped (CATS; the converter's gate criterion);
- gate, per-token top-k: each token keeps its own largest |act(g_i)| (same share in every token);
- product, threshold: |act(g_i) u_i| x ||down_i|| <= t'_l dropped (the converter's product criterion);
- product, per-token top-k: each token keeps its own largest |act(g_i) u_i| x ||down_i||.

Prints a Markdown table of held-out perplexity and its change against dense. SmolLM2 takes ~4 min
for four sparsities on 2 cores, Gemma 3 ~15 (its 262,144-row head is multiplied in float64).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sparsity", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--train-chunks", type=int, default=2)
    a = ap.parse_args()
    import reference_forward as rf

    from gguf_flash import models
    from gguf_flash.flash.calibrate import default_calibration_text
    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.tokenizer import tokenizer_from_gguf

    path = models.resolve(a.model)
    ref = rf.load_reference(str(path))
    tok = tokenizer_from_gguf(GGUFFile(str(path)))
    ids = tok.encode(default_calibration_text()[0], add_special=False, parse_special=False)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    chunk, n_chunks, n_held = 512, 8, 2
    per = chunk - len(bos)
    chunks = [np.asarray(bos + ids[c * per:(c + 1) * per], np.int64) for c in range(n_chunks)]
    train, held = chunks[:a.train_chunks], chunks[n_chunks - n_held:]
    L = ref.config.n_layer
    down_norm = [np.linalg.norm(ref.weight(f"blk.{il}.ffn_down.weight"), axis=0) for il in range(L)]   # (n_ff,)

    def perplexity(hook):
        ref.ffn_hook = hook
        total, count = 0.0, 0
        for ch in held:
            lg = ref.logits(ch)[:-1]
            m = lg.max(1)
            lse = m + np.log(np.exp(lg - m[:, None]).sum(1))
            total += float((lse - lg[np.arange(len(lg)), ch[1:]]).sum())
            count += len(lg)
        ref.ffn_hook = None
        return float(np.exp(total / count))

    t0 = time.perf_counter()
    gate_abs = [[] for _ in range(L)]       # per layer, (T, n_ff) f32 of the training chunks
    prod_abs = [[] for _ in range(L)]

    def collect(il, act, up):
        gate_abs[il].append(np.abs(act).astype(np.float32))
        prod_abs[il].append((np.abs(act * up) * down_norm[il]).astype(np.float32))
        return act

    ref.ffn_hook = collect
    for ch in train:
        ref.logits(ch)
    ref.ffn_hook = None
    gate_abs = [np.concatenate(g) for g in gate_abs]
    prod_abs = [np.concatenate(p) for p in prod_abs]
    dense = perplexity(None)
    print(f"{path.name}: held-out {n_held} x {chunk} tokens, thresholds from {len(train)} x {chunk}; "
          f"dense {dense:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def threshold(scores, t):
        return lambda il, act, up: np.where(scores(il, act, up) > t[il], act, 0.0)

    def topk(s, scores=lambda il, act, up: np.abs(act)):
        def hook(il, act, up):
            k = int(round(s * act.shape[1]))
            out = act.copy()
            np.put_along_axis(out, np.argpartition(scores(il, act, up), k, axis=1)[:, :k], 0.0, axis=1)
            return out
        return hook

    rows = []
    for s in [float(x) for x in a.sparsity.split(",")]:
        tg = [np.quantile(g, s) for g in gate_abs]
        tp = [np.quantile(p, s) for p in prod_abs]
        got = [perplexity(threshold(lambda il, act, up: np.abs(act), tg)), perplexity(topk(s)),
               perplexity(threshold(lambda il, act, up: np.abs(act * up) * down_norm[il], tp)),
               perplexity(topk(s, lambda il, act, up: np.abs(act * up) * down_norm[il]))]
        rows.append((s, got))
        print(f"  {s}: " + ", ".join(f"{p:.3f}" for p in got), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n| sparsity | gate, threshold (CATS) | gate, per-token top-k | product, threshold | product, per-token top-k |")
    print("|---|---|---|---|---|")
    for s, got in rows:
        print(f"| {s} | " + " | ".join(f"{p:.3f} ({100 * (p / dense - 1):+.1f}%)" for p in got) + " |")


if __name__ == "__main__":
    main()
