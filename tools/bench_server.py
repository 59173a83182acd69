"""Server benchmark (issue 14): time to first token and decode tok/s through `gguf-flash serve` (the
openai client, streamed) against the in-process API (LLM.stream) on the same prompts, and the server's
RSS against a process that only loads the model.

    python tools/bench_server.py [smollm2] [--rounds 3] [--tokens 64] [--threads 2]

The two sides run alternately (round by round) so a busy machine slows both alike. The server runs on
a free 127.0.0.1 port and is stopped at the end. Prints Markdown tables.
"""

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a ~110-token user message; each round changes its first word so no prompt is a repeat of another
STORY = ("write a short story about a lighthouse keeper who finds a message in a bottle. The story should "
         "mention the sea, the weather of that night, the color of the bottle, the words on the paper, and "
         "what the keeper decides to do the next morning. Keep the language simple, use short sentences, "
         "and end with a hopeful line. Do not use any dialogue; describe everything from the keeper's view.")
WORDS = ["Please", "Kindly", "Now", "Today", "Quickly", "Carefully", "Gently", "Simply"]

RSS_CHILD = r"""
import sys, psutil
mods = sys.argv[2:]
for m in mods:
    __import__(m)
before = psutil.Process().memory_info().rss
if sys.argv[1] != "-":
    import gguf_flash
    llm = gguf_flash.load(sys.argv[1], n_ctx=1024, n_threads=2)
    llm.generate("Hello", n_predict=4)
print(before, psutil.Process().memory_info().rss)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_of(model, *mods):
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(model), *mods], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    before, after = map(int, out.stdout.split())
    return before / 2**20, after / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds between measurements (the other side's compute threads go idle)")
    a = ap.parse_args()

    import openai
    import psutil
    import gguf_flash
    from gguf_flash.sampling import GREEDY

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gguf_flash", "serve", "-m", a.model, "-c", "1024",
                             "-t", str(a.threads), "--port", str(port)], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if json.load(urllib.request.urlopen(base + "/health", timeout=2)).get("status") == "ok":
                    break
            except OSError:
                pass
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        llm = gguf_flash.load(a.model, n_ctx=1024, n_threads=a.threads)
        gc.collect()
        gc.freeze()          # as the server's worker does after loading: no full GC pass over the model
        rows = {"in-process, completion": [], "server, /v1/completions": [], "in-process": [], "server": [],
                "in-process, 2nd turn": [], "server, 2nd turn": [], "not counted": []}

        def in_process_text(prompt, key):
            time.sleep(a.pause)
            ids = llm.tokenize(prompt)
            t0, times = time.perf_counter(), []
            llm.generate(ids, a.tokens, GREEDY, ignore_eos=True, stream=lambda _: times.append(time.perf_counter() - t0))
            rows[key].append((times[0], (len(times) - 1) / (times[-1] - times[0]), len(ids), 0))

        def served_text(prompt, key):
            time.sleep(a.pause)
            t0 = time.perf_counter()
            times, usage = [], None
            for c in client.completions.create(model=a.model, prompt=prompt, max_tokens=a.tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
                if c.choices and c.choices[0].text:
                    times.append(time.perf_counter() - t0)
                if c.usage:
                    usage = c.usage
            rows[key].append((times[0], (len(times) - 1) / (times[-1] - times[0]), usage.prompt_tokens,
                              usage.prompt_tokens_details.cached_tokens))

        def in_process(messages, key):
            time.sleep(a.pause)
            ids = llm.chat_ids(messages)
            t0 = time.perf_counter()
            times = [time.perf_counter() - t0 for _ in llm.stream(ids, n_predict=a.tokens, params=GREEDY)]
            rows[key].append((times[0], (len(times) - 1) / (times[-1] - times[0]), len(ids), 0))

        def served(messages, key):
            time.sleep(a.pause)
            t0 = time.perf_counter()
            times, usage, text = [], None, ""
            for c in client.chat.completions.create(model=a.model, messages=messages, max_tokens=a.tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
                if c.choices and c.choices[0].delta.content:
                    times.append(time.perf_counter() - t0)
                    text += c.choices[0].delta.content
                if c.usage:
                    usage = c.usage
            rows[key].append((times[0], (len(times) - 1) / (times[-1] - times[0]), usage.prompt_tokens,
                              usage.prompt_tokens_details.cached_tokens))
            return text

        served([{"role": "user", "content": "Hi"}], "server")          # warm-up of both sides, not counted
        in_process([{"role": "user", "content": "Hi"}], "in-process")
        for k in rows:
            rows[k].clear()
        for r in range(a.rounds):
            # a raw prompt (no chat template) after a chat: nothing in the server's cache matches it
            served_text(f"{WORDS[r % len(WORDS)]} {STORY}", "server, /v1/completions")
            in_process_text(f"{WORDS[r % len(WORDS)]} {STORY}", "in-process, completion")
            m1 = [{"role": "user", "content": f"{WORDS[r % len(WORDS)]} {STORY}"}]
            reply = served(m1, "server")
            in_process(m1, "in-process")
            m2 = m1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Now make it shorter."}]
            served(m1, "not counted")       # put the first turn back in the server's cache
            served(m2, "server, 2nd turn")
            in_process(m2, "in-process, 2nd turn")
        server_rss = psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"{a.model}, {a.threads} threads, {a.tokens} greedy tokens, median of {a.rounds} rounds "
          f"(tokens/s = streamed pieces after the first / their time)\n")
    print("| path | prompt tokens | of them cached | time to first token | decode tok/s |")
    print("|---|---|---|---|---|")
    for k, v in rows.items():
        if k == "not counted":
            continue
        ttft = statistics.median(x[0] for x in v)
        tps = statistics.median(x[1] for x in v)
        lo, hi = min(x[3] for x in v), max(x[3] for x in v)
        cached = f"{lo}" if lo == hi else f"{lo}-{hi}"
        print(f"| {k} | {v[0][2]} | {cached} | {1000 * ttft:.0f} ms | {tps:.1f} |")
    bare, _ = rss_of("-")
    web, _ = rss_of("-", "starlette", "uvicorn", "llguidance")
    _, engine = rss_of(a.model)
    print(f"\nRSS: python {bare:.0f} MiB; + starlette, uvicorn, llguidance imported {web:.0f} MiB "
          f"(+{web - bare:.0f} MiB); a process that loads {a.model} and generates {engine:.0f} MiB; "
          f"the server after the benchmark {server_rss:.0f} MiB (+{server_rss - engine:.0f} MiB)")


if __name__ == "__main__":
    main()
