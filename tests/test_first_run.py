"""First run (firstrun.py): on an empty kernel cache the CLI says what it compiles and where it caches
it, compiles in a child process, and compiles only the model's quant types; a warm cache says nothing.
Library users get the same through logging, not prints."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

from gguf_flash import firstrun
from gguf_flash.kernels import dispatch

REPO = Path(__file__).resolve().parents[1]


def _cli(args, cache):
    env = dict(os.environ, GGUF_FLASH_CACHE=str(cache), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "gguf_flash", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_first_run_compiles_the_model_types_with_a_progress_line_then_says_nothing(tiny_llama_path, tmp_path):
    """The synthetic model is all Q8_0: a first `run` on an empty cache prints the line naming Q8_0 and
    the cache folder, compiles Q8_0's kernels and no other type's, and generates; the second run is
    silent about kernels and generates the same text."""
    cache = tmp_path / "cache"
    args = ["run", "-m", str(tiny_llama_path), "-p", "hello", "-n", "4", "--temp", "0", "--ignore-eos"]
    first = _cli(args, cache)
    assert first.returncode == 0, first.stderr
    assert "gguf-flash: compiling kernels for Q8_0 (first run only, about " in first.stderr
    folders = list((cache / "numba").iterdir())
    assert len(folders) == 1
    assert f"cached in {folders[0]})" in first.stderr
    assert "compiling: " in first.stderr and "done" in first.stderr   # the bar, closed
    cached = {p.name.split("-")[0] for p in folders[0].rglob("*.nbi")}
    assert "quant_basic.matvec_q8x_q8_0" in cached and "quant_basic.matmat_q8_0" in cached
    others = [n for n in cached if n.startswith(("quant_k.", "quant_basic.matmat_q4", "quant_basic.matvec_f"))]
    assert others == []
    assert list(folders[0].glob("dense-*-Q8_0-f16.warm"))
    second = _cli(args, cache)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr
    assert second.stdout == first.stdout


def test_type_set_names_only_the_model_types():
    ts = dispatch.type_set([dispatch.Q8_0, dispatch.Q4_1, dispatch.Q4_1])
    assert dispatch.type_names(ts) == ["Q4_1", "Q8_0"]
    assert dispatch.type_names(dispatch.ALL_TYPES) == [dispatch.TYPE_NAMES[t] for t in dispatch.SUPPORTED]


def test_a_chain_calls_only_the_kernels_of_its_type_set():
    """The generated per-type chain refers to the kernels of the types present, none other: numba never
    types (so never compiles) the others."""
    chain = dispatch._chain(dispatch.MATVEC, "qt, out, w, x, xq, tset", "out, w, x", "out, w, xq", "return None",
                            numba.typeof(dispatch.type_set([dispatch.Q4_1, dispatch.Q6_K])))
    kernels = {v for k, v in chain.__globals__.items() if k.startswith("k")}
    assert kernels == {dispatch.MATVEC[dispatch.Q4_1], dispatch.MATVEC[dispatch.Q6_K]}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache folder with no marker; the compile child replaced by one that succeeds at once."""
    monkeypatch.setattr(firstrun, "cache_folder", lambda: str(tmp_path))
    ran = []
    monkeypatch.setattr(firstrun, "_run_child", lambda argv, bar: ran.append(argv) or (True, ""))
    return tmp_path, ran


def test_library_users_get_logging_not_prints(empty_cache, capsys, caplog):
    folder, ran = empty_cache
    ts = dispatch.type_set([dispatch.Q4_1, dispatch.Q8_0])
    with caplog.at_level(logging.INFO, logger="gguf_flash.firstrun"):
        firstrun.ensure_compiled("m.gguf", "dense", ts)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert any(f"compiling kernels for Q4_1, Q8_0 (first run only, about" in r.getMessage()
               and f"cached in {folder}" in r.getMessage() for r in caplog.records)
    assert len(ran) == 1 and ran[0][-4:] == ["m.gguf", "dense", "f16", "0"]


def test_progress_prints_the_line_on_stderr_and_a_warm_cache_prints_nothing(empty_cache, capsys):
    folder, ran = empty_cache
    ts = dispatch.type_set([dispatch.Q4_K, dispatch.Q6_K])
    firstrun.ensure_compiled("m.gguf", "flash", ts, kv_type="f32", logit_rows=32, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("gguf-flash: compiling kernels for Q4_K, Q6_K (first run only, about ")
    assert len(ran) == 1
    # the child leaves the marker (here by hand): the next run prints nothing and starts no child
    Path(firstrun.marker("flash", ts, "f32", 32)).write_text("compiled\n")
    firstrun.ensure_compiled("m.gguf", "flash", ts, kv_type="f32", logit_rows=32, progress=True)
    assert capsys.readouterr().err == "" and len(ran) == 1
    # another KV cache type is another set of compiled signatures
    firstrun.ensure_compiled("m.gguf", "flash", ts, kv_type="f16", logit_rows=32, progress=True)
    assert "compiling kernels" in capsys.readouterr().err and len(ran) == 2
