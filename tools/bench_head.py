"""Head-index benchmark (issue 12): how well the indexed head stands in for the whole head.

    python tools/bench_head.py MODEL [--source MODEL.gguf] [--cap d-0.5] [--tokens 64] [--sampler greedy|default]
        [--margin X]

The whole head's greedy output of 8 prompts x --tokens tokens (`--head exact`) is the reference; the
indexed head (`--head index`, at --cap) is then teacher-forced along it, and on each of its states also
computes the whole head (not counted). Per step: the same top token as the whole head on the same state?
KL(whole || indexed distribution) (the indexed logits: exact for the rows read, the preview for the rest),
head rows, bytes and reads; and the same top token as the `--head exact` run's. That last one also counts
near ties that the two runs' own float differences flip (their plans differ, e.g. the prompt chunk: 64
against 128 tokens), which is why the index is judged against its own state. Prints a Markdown table.
Both runs are fresh child processes with cold reads.

--sampler default: the indexed head serves llama.cpp's default sampler (temperature 0.8, top-k 40, top-p
0.95, min-p 0.05), so it reads with the samplers' margin and bar; the table then also gives the KL between
the distributions that sampler draws from (whole head against indexed), and how often their candidate
sets differ. The teacher-forced tokens stay the whole head's greedy output.

--margin X: the indexed run reads with margin X in place of the file's calibrated one (greedy, or the
samplers' with --sampler default): what reading more or fewer rows does to agreement and KL.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import DENSE, PROMPT_TEXT, model_paths, resolve_cap, run_child  # noqa: E402

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "Explain how a refrigerator works.", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "List five fruits and their colors:",
           "Translate to French: The weather is nice today."]

CHILD = r"""
import json, sys
import numpy as np
import gguf_flash
from gguf_flash.flash.head_index import need_for
from gguf_flash.sampling import GREEDY, SamplingParams
from gguf_flash.flash.stats import TokenStats
path, cap, head, n_tok, d = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
prompts = json.loads(sys.argv[6])
params = GREEDY if sys.argv[7] == "greedy" else SamplingParams()
llm = gguf_flash.load(path, max_ram=None if cap == "none" else cap, n_ctx=256, n_threads=2, cold=True, head=head)
m = llm.model
if sys.argv[8] != "file" and m.indexed is not None:
    m.indexed.margin = m.indexed.margin_dist = float(sys.argv[8])
ref = json.load(open(f"{d}/exact.json")) if head != "exact" else None
out = dict(plan=m.plan.describe(), steps=[], tokens=[])
for i, p in enumerate(prompts):
    ids = llm.tokenize(p)
    m.set_head_need(need_for(params))
    logits = m.prefill(ids, 0)
    toks = []
    for k in range(n_tok):
        np.save(f"{d}/{head}.{i}.{k}.npy", logits)            # logits are saved as they are
        st = m.stats[-1] if k else m.prompt_stats[-1]
        out["steps"].append(dict(rows=st.head_rows, bytes=st.head_bytes, reads=st.head_reads))
        if head == "index":   # the whole head on the same state (not counted in the step's statistics)
            m.out_head(m.cfg.rms_eps, TokenStats())
            np.save(f"{d}/whole.{i}.{k}.npy", m.st.logits)
        t = int(np.argmax(logits)) if ref is None else ref["tokens"][i][k]
        toks.append(t)
        logits = m.forward(t, len(ids) + k)
    out["tokens"].append(toks)
json.dump(out, open(f"{d}/{head}.json", "w"))
print(json.dumps(dict(plan=out["plan"])))
"""


def sampler_kl(whole, idx):
    """(KL, same candidates): between the distributions llama.cpp's default sampler draws from on two
    logit vectors (a candidate the indexed side lacks counts at probability 1e-12)."""
    import numpy as np
    from gguf_flash.sampling import Sampler, SamplingParams
    s = Sampler(SamplingParams())
    ip, pp = s.distribution(whole)
    iq, pq = s.distribution(idx)
    q = dict(zip(iq.tolist(), pq.tolist()))
    kl = float(sum(p * np.log(p / max(q.get(i, 0.0), 1e-12)) for i, p in zip(ip.tolist(), pp.tolist())))
    return kl, int(set(ip.tolist()) == set(iq.tolist()))


def main():
    import tempfile
    import numpy as np
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--source", default=None)
    ap.add_argument("--cap", default="d-0.5")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sampler", choices=("greedy", "default"), default="greedy")
    ap.add_argument("--margin", type=float, default=None, help="read with this margin, not the file's")
    a = ap.parse_args()
    path, source = model_paths(a.model, a.source)
    src_size = os.path.getsize(source)
    _, dense_peak = run_child(DENSE, [source, 32, PROMPT_TEXT])
    cap = resolve_cap(a.cap, path, "flash", dense_peak, src_size)
    logp = lambda z: z - z.max() - np.log(np.exp(z - z.max()).sum())  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        margin = "file" if a.margin is None else str(a.margin)
        run_child(CHILD, [path, f"{cap}M", "exact", a.tokens, d, json.dumps(PROMPTS), "greedy", "file"], sample=False)
        info, peak = run_child(CHILD, [path, f"{cap}M", "index", a.tokens, d, json.dumps(PROMPTS), a.sampler, margin])
        steps = json.load(open(f"{d}/index.json"))["steps"]
        plan = json.loads(info)["plan"]
        j = 0
        for i in range(len(PROMPTS)):
            for k in range(a.tokens):
                full = logp(np.load(f"{d}/exact.{i}.{k}.npy").astype(np.float64))
                whole = logp(np.load(f"{d}/whole.{i}.{k}.npy").astype(np.float64))
                idx = logp(np.load(f"{d}/index.{i}.{k}.npy").astype(np.float64))
                steps[j].update(same=int(np.argmax(whole) == np.argmax(idx)),
                                kl=float((np.exp(whole) * (whole - idx)).sum()),
                                same_run=int(np.argmax(full) == np.argmax(idx)))
                if a.sampler == "default":
                    steps[j].update(zip(("kl_s", "set_s"), sampler_kl(whole, idx)))
                j += 1
    from gguf_flash.gguf_file import GGUFFile
    f = GGUFFile(path)
    name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    head_bytes, n_vocab = f.tensor(name).n_bytes, f.tensor(name).n_rows
    arr = lambda k: np.array([s[k] for s in steps], np.float64)  # noqa: E731
    rows, nbytes, reads = arr("rows"), arr("bytes"), arr("reads")
    print(f"\n{os.path.basename(path)}: cap {cap} MiB ({a.cap}; {cap * 2**20 / dense_peak:.2f} x the dense engine's "
          f"peak RSS {dense_peak / 2**20:.0f} MiB), peak RSS {peak / 2**20:.0f} MiB, "
          f"{len(PROMPTS)} prompts x {a.tokens} tokens teacher-forced along the whole head's greedy output"
          f"{'' if a.margin is None else f', margin {a.margin} (not the file)'}\n")
    print("| same top-1 | mean KL (nats) | max KL | head rows read (mean / median / p90) | head bytes read (mean / p90) | reads/token | stopped early | same top-1 as the `--head exact` run |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {100 * arr('same').mean():.2f}% ({int((1 - arr('same')).sum())} of {len(steps)} differ) | "
          f"{arr('kl').mean():.4f} | {arr('kl').max():.3f} | {100 * rows.mean() / n_vocab:.1f}% / "
          f"{100 * np.median(rows) / n_vocab:.1f}% / {100 * np.quantile(rows, 0.9) / n_vocab:.1f}% | "
          f"{100 * nbytes.mean() / head_bytes:.1f}% / {100 * np.quantile(nbytes, 0.9) / head_bytes:.1f}% | "
          f"{reads.mean():.0f} | {100 * (rows < n_vocab).mean():.0f}% | {100 * arr('same_run').mean():.2f}% |")
    if a.sampler == "default":
        print(f"\nllama.cpp's default sampler (T 0.8, top-k 40, top-p 0.95, min-p 0.05), the distribution it draws "
              f"from: mean KL(whole || indexed) {arr('kl_s').mean():.4f} nats, max {arr('kl_s').max():.3f}; candidate "
              f"sets differ in {100 * (1 - arr('set_s')).mean():.1f}% of the steps")
    print(f"\nplan: {plan}")


if __name__ == "__main__":
    main()
