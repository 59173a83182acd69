"""`gguf-flash serve` through the official `openai` client: every answer is compared with the in-process
API on the same model (greedy), the queue and its 503, prefix reuse across a chat's turns, a table of bad
requests, and the RAM cap held while serving a flash model. One server process per module; loopback only."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("llguidance")

from gguf_flash.sampling import GREEDY, log_softmax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
N_CTX = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status_code: int
    headers: dict
    text: str

    def json(self):
        return json.loads(self.text)


def http(url, data: bytes | None = None, headers=None, timeout=120) -> Reply:
    """One HTTP request with the standard library (the openai client covers the happy paths)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


def health(base):
    return http(base + "/health", timeout=5)


def start_server(model, *args, timeout=240, launcher=(sys.executable, "-m", "gguf_flash")):
    """Start `gguf-flash serve` on a free loopback port; returns (proc, base_url, saw_503). launcher: the
    command before `serve` (a test's script that installs a fault, then calls cli.main)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([*launcher, "serve", "-m", str(model), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    saw_503, t_end = False, time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            return proc, base, saw_503
        try:
            r = health(base)
            if r.status_code == 200:
                return proc, base, saw_503
            saw_503 |= r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("the server did not become healthy")


def stop_server(proc):
    proc.terminate()
    try:
        return proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@pytest.fixture(scope="module")
def server(smollm2_path):
    proc, base, saw_503 = start_server(smollm2_path, "-c", str(N_CTX), "-t", "2", "--api-key", KEY,
                                       "--queue", "8", "--alias", "smollm2")
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    yield base, saw_503
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["Content-Type"] = "application/json"
    return http(server[0] + path, raw if raw is not None else json.dumps(body).encode(), headers)


def reference_chat(llm, messages, n):
    return llm.chat(messages, n_predict=n, params=GREEDY)


def finish_of(res, n):
    return "length" if res.stop_reason in ("length", "context") else "stop"


# ---- endpoints -----------------------------------------------------------------------------------


def test_health_503_while_loading_then_ok_and_models(server, client):
    assert server[1], "GET /health never answered 503 'Loading model' while the model loaded"
    h = health(server[0]).json()
    assert h["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


def test_chat_equals_in_process_streamed_and_not(client, smollm2_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = reference_chat(smollm2_llm, messages, 24)
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == finish_of(ref, 24)
    assert r.usage.prompt_tokens == len(smollm2_llm.chat_ids(messages))
    assert r.usage.completion_tokens == len(ref.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish_of(ref, 24)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.tokens)
    # the same prompt again: everything but the last prompt token comes from the KV cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_stop_string_with_null_max_tokens_and_unknown_fields(server, smollm2_llm):
    """max_tokens null = until the end (here: a stop string); unknown fields of any type are ignored."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2_llm.chat_ids(messages)
    ref = smollm2_llm.chat(messages, n_predict=N_CTX - len(ids), params=GREEDY, stop=["."])
    assert ref.stop_reason == "stop"
    r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": None, "stop": ".",
                                              "temperature": 0, "frobnicate": {"x": [1, None]}, "user": 7})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == ref.text and choice["finish_reason"] == "stop"


def test_seeded_sampling_equals_in_process(client, smollm2_llm):
    from gguf_flash.sampling import SamplingParams
    messages = [{"role": "user", "content": "Write a line about rain."}]
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, seed=11)
    ref = smollm2_llm.chat(messages, n_predict=12, params=params)
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0.9, top_p=0.9,
                                       seed=11, extra_body={"top_k": 30, "min_p": 0.02})
    assert r.choices[0].message.content == ref.text


def test_sse_ends_with_done(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                              "stream": True, "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_completions_equal_in_process(client, smollm2_llm):
    prompt = "The three primary colors are"
    ref = smollm2_llm.generate(prompt, n_predict=12)
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(smollm2_llm.tokenize(prompt))
    assert r.usage.completion_tokens == len(ref.tokens)


def test_logprobs_are_the_models(client, smollm2_llm):
    messages = [{"role": "user", "content": "Name a fruit."}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=3)
    ids = smollm2_llm.chat_ids(messages)
    lp = log_softmax(smollm2_llm.logits(ids))                  # (n_vocab,) f64
    first = r.choices[0].logprobs.content[0]
    best = int(np.argmax(lp))
    assert first.token == smollm2_llm.tokenizer.token_bytes(best).decode("utf-8", "replace")
    assert abs(first.logprob - lp[best]) < 1e-3
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].logprob == first.logprob
    assert first.top_logprobs[1].logprob <= first.top_logprobs[0].logprob


def test_tokenize_detokenize(server, smollm2_llm):
    text = "Hello, world! <|im_start|> ok"
    r = post(server, "/tokenize", {"content": text})
    assert r.status_code == 200
    assert r.json()["tokens"] == smollm2_llm.tokenize(text, add_special=False)
    r2 = post(server, "/detokenize", {"tokens": r.json()["tokens"]})
    assert r2.json()["content"] == smollm2_llm.detokenize(r.json()["tokens"])
    pieces = post(server, "/tokenize", {"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hi there"


def test_json_object_and_json_schema(client):
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": 'Reply with a JSON object with one key "color".'}],
        max_tokens=60,
        temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Invent a person."}], max_tokens=40,
        temperature=0.7, seed=3, response_format={"type": "json_schema",
                                                  "json_schema": {"name": "person", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int) and 0 <= obj["age"] <= 99
    assert r.choices[0].finish_reason == "stop"


# ---- queue, concurrency, cancellation -----------------------------------------------------------


PROMPTS = ["Name a color.", "What is 2+2?", "Say hello in French.", "Name a planet.", "What is ice?",
           "Name a dog breed.", "What is the sun?", "Count to three."]


def test_eight_clients_then_a_full_queue_gets_503(server, client, smollm2_llm):
    refs = [reference_chat(smollm2_llm, [{"role": "user", "content": p}], 8).text for p in PROMPTS]
    # hold the worker: a long streamed generation that ignores end-of-generation (llama-server's field)
    holder = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell a story."}],
                                            max_tokens=900, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(holder))
    results, errors = [None] * 8, []

    def ask(i):
        try:
            r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPTS[i]}],
                                               max_tokens=8, temperature=0)
            results[i] = r.choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    t_end = time.time() + 30
    while health(server[0]).json()["queued"] < 8 and time.time() < t_end:
        time.sleep(0.05)
    assert health(server[0]).json()["queued"] == 8
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "one more"}], "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
    t0 = time.time()
    holder.close()               # a client that goes away: its generation stops at the next token
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == refs
    # 900 tokens would take far longer than eight 8-token answers; they finished, so the holder stopped
    assert time.time() - t0 < 45


def test_three_turn_chat_prefills_only_new_tokens(client, smollm2_llm):
    messages = [{"role": "system", "content": "You are terse."}]
    prev = None
    for question in ("Name a color.", "Another one?", "And a third?"):
        messages.append({"role": "user", "content": question})
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0)
        u = r.usage
        assert u.prompt_tokens == len(smollm2_llm.chat_ids(messages))
        assert u.prompt_tokens_details.cached_tokens == u.model_extra["prompt_tokens_cached"]
        if prev is not None:
            # the whole previous conversation is reused: its prompt and every reply token that went
            # through the model (all of them after an end-of-generation; all but the last at max_tokens)
            forwarded = prev.prompt_tokens + prev.completion_tokens - (prev_finish == "length")
            assert u.prompt_tokens_details.cached_tokens == forwarded
            # so only the new turn is prefilled: the question, its role markers and the reply's end
            new_turn = len(smollm2_llm.tokenize(question, add_special=False)) + 12
            assert 0 < u.prompt_tokens - u.prompt_tokens_details.cached_tokens <= new_turn
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        prev, prev_finish = u, r.choices[0].finish_reason


# ---- bad input -----------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hi"}]
BAD = [
    ("invalid JSON", CHAT, None, b"{not json", KEY, 400),
    ("body not an object", CHAT, None, b"[1, 2]", KEY, 400),
    ("no messages", CHAT, {"model": "smollm2"}, None, KEY, 400),
    ("empty messages", CHAT, {"messages": []}, None, KEY, 400),
    ("messages not a list", CHAT, {"messages": "Hi"}, None, KEY, 400),
    ("bad role", CHAT, {"messages": [{"role": "robot", "content": "Hi"}]}, None, KEY, 400),
    ("content a number", CHAT, {"messages": [{"role": "user", "content": 5}]}, None, KEY, 400),
    ("temperature a string", CHAT, {"messages": MSG, "temperature": "hot"}, None, KEY, 400),
    ("negative max_tokens", CHAT, {"messages": MSG, "max_tokens": -1}, None, KEY, 400),
    ("max_tokens a string", CHAT, {"messages": MSG, "max_tokens": "10"}, None, KEY, 400),
    ("max_tokens a bool", CHAT, {"messages": MSG, "max_tokens": True}, None, KEY, 400),
    ("top_p zero", CHAT, {"messages": MSG, "top_p": 0}, None, KEY, 400),
    ("n = 2", CHAT, {"messages": MSG, "n": 2}, None, KEY, 400),
    ("stop a number", CHAT, {"messages": MSG, "stop": 7}, None, KEY, 400),
    ("stream a string", CHAT, {"messages": MSG, "stream": "yes"}, None, KEY, 400),
    ("bad response_format", CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, None, KEY, 400),
    ("top_logprobs 50", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, None, KEY, 400),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": MSG}, None, KEY, 404),
    ("prompt longer than the context", CHAT, {"messages": [{"role": "user", "content": "word " * (N_CTX + 50)}]},
     None, KEY, 400),
    ("no API key", CHAT, {"messages": MSG}, None, None, 401),
    ("wrong API key", CHAT, {"messages": MSG}, None, "sk-wrong", 401),
    ("completions without prompt", "/v1/completions", {"max_tokens": 2}, None, KEY, 400),
    ("completions token id out of range", "/v1/completions", {"prompt": [1, 10**9]}, None, KEY, 400),
    ("detokenize non-ids", "/detokenize", {"tokens": ["a"]}, None, KEY, 400),
    ("tokenize without content", "/tokenize", {}, None, KEY, 400),
    ("no such endpoint", "/v1/nothing", {}, None, KEY, 404),
    ("a 5 MiB body", CHAT, None, b'{"messages": "' + b"x" * (5 << 20) + b'"}', KEY, 413),
]


@pytest.mark.parametrize("name,path,body,raw,key,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_its_4xx_and_the_server_lives(server, name, path, body, raw, key, status):
    r = post(server, path, body, key=key, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and "\n" not in err["message"]
    ok = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


# ---- the RAM cap while serving (flash mode, a tiny synthetic model) -----------------------------


@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    import gguf_flash
    from gguf_flash.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("srvflash")
    src = write_synthetic(d / "t.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                          n_head_kv=2, n_vocab=300, n_ctx=256, qtype="Q8_0", seed=5)
    calib = d / "c.txt"
    calib.write_text(" ".join(f"w{i % 50} x{i % 7}" for i in range(3000)))
    gguf_flash.convert(src, d / "t.flash.gguf", calib=calib, calib_tokens=512, sparsity=0.5, rank=8)
    return d / "t.flash.gguf"


def test_rss_stays_under_the_cap_while_serving(tiny_flash):
    from gguf_flash.flash.budget import sample_peak_rss
    refused, _, _ = start_server(tiny_flash, "--max-ram", "1M", "-c", "128", "-t", "2")
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and len(err.strip().splitlines()) >= 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("gguf-flash: error:") and "needs at least" in line
    cap_mib = int(line.split("needs at least ")[1].split(" MiB")[0]) + 8
    proc, base, _ = start_server(tiny_flash, "--max-ram", f"{cap_mib}M", "-c", "128", "-t", "2")
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    peak = {}
    sampler = threading.Thread(target=lambda: peak.setdefault("rss", sample_peak_rss(proc, every=0.005)))
    sampler.start()
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        for i in range(6):
            r = c.completions.create(model="t.flash", prompt=f"w{i} x1 w2", max_tokens=24, temperature=0.8, seed=i,
                                     extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 24
            r = c.chat.completions.create(model="t.flash", messages=[{"role": "user", "content": f"w{i} x3"}],
                                          max_tokens=16, stream=True)
            assert sum(1 for _ in r) >= 2
    finally:
        stop_server(proc)
        sampler.join(timeout=30)
    print(f"server peak RSS sampled from outside: {peak['rss'] / 2**20:.1f} MiB, cap {cap_mib} MiB")
    assert 0 < peak["rss"] <= cap_mib << 20


TRUNCATING_SERVER = r"""
import os, sys
from gguf_flash import sampling
from gguf_flash.cli import main
trigger, k = sys.argv[1], int(sys.argv[2])
real_sample, n = sampling.Sampler.sample, [0]
def sample(self, logits, history):
    tok = real_sample(self, logits, history)
    if os.path.exists(trigger):   # armed by the test: truncate the model file after k more tokens
        n[0] += 1
        if n[0] == k:
            model = sys.argv[sys.argv.index("-m") + 1]
            os.truncate(model, os.path.getsize(model) // 2)
    return tok
sampling.Sampler.sample = sample
sys.exit(main(sys.argv[3:]))
"""


def test_flash_file_truncated_while_serving(tiny_flash, tmp_path):
    """The model file is cut while a streamed completion generates: the stream ends with a server_error
    event naming the file (after the tokens already sent) and [DONE]; later requests get a 500 naming the
    file and saying to restart, /health turns 500, and the server keeps answering."""
    model, trigger = tmp_path / "m.flash.gguf", tmp_path / "armed"
    model.write_bytes(tiny_flash.read_bytes())
    proc, base, _ = start_server(model, "--mode", "naive", "-c", "128", "-t", "1",
                                 launcher=(sys.executable, "-c", TRUNCATING_SERVER, str(trigger), "5"))
    try:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        srv = (base,)
        body = {"prompt": "w1 x2", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        assert post(srv, "/v1/completions", body, key=None).status_code == 200
        trigger.touch()
        r = post(srv, "/v1/completions", dict(body, stream=True), key=None)
        events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
        assert r.status_code == 200 and events[-1] == "[DONE]", r.text[-2000:]
        err = json.loads(events[-2])["error"]
        texts = [c for e in events[:-2] for c in json.loads(e)["choices"] if c.get("text")]
        assert err["type"] == "server_error" and err["code"] == "model_file_fault"
        assert err["message"].startswith("completions: server-side fault after 5 generated tokens: "
                                         f"{model}: changed on disk since it was opened: truncated"), err
        assert 1 <= len(texts) <= 5
        after = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, key=None)
        assert after.status_code == 500 and after.json()["error"]["code"] == "model_file_fault"
        assert str(model) in after.json()["error"]["message"] and "restart" in after.json()["error"]["message"]
        h = health(base)
        assert h.status_code == 500 and str(model) in h.json()["error"]["message"]
        tok = post(srv, "/tokenize", {"content": "w1 x2"}, key=None)
        assert tok.status_code == 200 and tok.json()["tokens"] and proc.poll() is None
    finally:
        _, err_text = stop_server(proc)
    assert "Traceback" not in err_text, err_text[-2000:]
    assert f"generation failed: {model}: changed on disk" in err_text
