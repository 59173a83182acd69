"""The flash runtime: the sparse FFN identity, the RAM cap (sampled from outside the process), refusal
of impossible caps, a file changed under the reader, statistics."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_flash
from conftest import decode_ffn
from gguf_flash.errors import FlashFormatError, InvalidArgumentError, RamCapError
from gguf_flash.flash.budget import parse_size, sample_peak_rss


def test_parse_size():
    assert parse_size("512K") == 512 * 1024 and parse_size("220M") == 220 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30)) and parse_size("4096") == 4096
    for bad in ("", "12Q", "-5M", "M"):
        with pytest.raises(InvalidArgumentError):
            parse_size(bad)


def test_thread_rows_keep_the_threads_lines_apart():
    """Each thread's accumulator row starts on a cache line, two lines or more after the part of the row
    before it in use (model.thread_rows: the prefetchers of one core fetched its neighbour's first lines)."""
    from gguf_flash.model import CACHE_LINE, thread_rows
    for n in (576, 100, 1):
        a = thread_rows(3, n)
        assert a.dtype == np.float32 and a.shape[0] == 3 and a.shape[1] >= n and not a.any()
        starts = [a[c].ctypes.data for c in range(3)]
        assert all(s % CACHE_LINE == 0 for s in starts)
        assert all(starts[c + 1] - (starts[c] + 4 * n) >= 2 * CACHE_LINE for c in range(2))


def _tiny_source(tmp_path):
    """(a 2-layer synthetic Q8_0 llama GGUF, a calibration text file) under tmp_path."""
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / "t.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                          n_head_kv=2, n_vocab=300, qtype="Q8_0", seed=5)
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(f"w{i % 50} x{i % 7}" for i in range(3000)))
    return src, calib


def test_sparse_ffn_with_every_neuron_equals_dense_ffn(tmp_path):
    """Identity (STYLE.md 8): down columns kept in F32, every neuron selected -> the flash file's
    logits equal the dense model's on the source (same gate/up bytes; float vs 8-bit activations
    on the down projection is the only difference)."""
    src, calib = _tiny_source(tmp_path)
    gguf_flash.convert(src, tmp_path / "t.flash.gguf", calib=calib, calib_tokens=1024, sparsity=0.5,
                       rank=8, down_type="F32")
    dense = gguf_flash.load(src, n_ctx=64)
    flash = gguf_flash.load(tmp_path / "t.flash.gguf", mode="dense", n_ctx=64)
    for pos, tok in enumerate([5, 17, 99, 200, 3, 42]):
        a = dense.model.forward(tok, pos).copy()
        b = flash.model.forward(tok, pos)
        np.testing.assert_allclose(b, a, atol=0.02 * np.abs(a).max())


def test_the_window_keeps_what_it_read_while_it_has_room(tmp_path):
    """Without a cap every layer's window has a slot for each row: decoding reads each row at most once
    (flash/window.py KEEP_WHILE_ROOM), where the paper's window of k tokens (window_k=1 here) read rows
    again once they had been inactive for k tokens; the logits are the same either way."""
    src, calib = _tiny_source(tmp_path)
    out = tmp_path / "t.flash.gguf"
    gguf_flash.convert(src, out, calib=calib, calib_tokens=1024, sparsity=0.5, rank=8)
    toks = [5, 17, 99, 200, 3, 42, 7, 8, 150, 260, 11, 64, 33, 90, 2, 120]
    loaded, logits = {}, {}
    from gguf_flash.flash.runtime import FlashModel
    from gguf_flash.gguf_file import GGUFFile
    gguf_flash.load(out, n_ctx=64)     # the kernels, compiled in a child as a run does
    for k in (None, 1):
        m = FlashModel(GGUFFile(out), n_ctx=64, selector="gate", window_k=k)
        logits[k] = np.array([m.forward(t, p).copy() for p, t in enumerate(toks)])
        loaded[k] = sum(s.loaded for s in m.stats)
        assert all(s.overflow == 0 for s in m.stats)
    n_rows = m.cfg.n_ff * m.cfg.n_layer
    assert 0 < loaded[None] <= n_rows < loaded[1], loaded
    np.testing.assert_array_equal(logits[None], logits[1])


def test_down_type_is_written_and_used(tmp_path):
    """--down-type: each bundle's down part is the source's down column quantized by gguf.quants as that
    type (byte for byte), and a flash file in dense mode drifts from the source's logits more the
    coarser the type (README "The down parts' type")."""
    from gguf import GGMLQuantizationType as T, quants

    from gguf_flash.config import config_from_gguf
    from gguf_flash.flash.format import read_flash
    from gguf_flash.gguf_file import GGUFFile
    src, calib = _tiny_source(tmp_path)
    dense = gguf_flash.load(src, n_ctx=64)
    toks = [5, 17, 99, 200, 3, 42]
    ref = np.array([dense.model.forward(t, p).copy() for p, t in enumerate(toks)])
    sf = GGUFFile(src)
    drift = {}
    for dt in ("Q8_0", "Q5_0", "Q4_0"):
        out = tmp_path / f"t-{dt}.flash.gguf"
        gguf_flash.convert(src, out, calib=calib, calib_tokens=1024, sparsity=0.5, rank=8, down_type=dt)
        f = GGUFFile(out)
        l = read_flash(f, config_from_gguf(f)).layers[1]
        assert l.types[2] == int(T[dt])
        rows = np.asarray(f.raw("blk.1.ffn_bundle")).reshape(len(l.neuron_id), -1)[:, sum(l.part_bytes[:2]):]
        cols = quants.dequantize(sf.raw("blk.1.ffn_down.weight"), T.Q8_0).T[l.neuron_id]   # (n_ff, n_embd)
        assert np.array_equal(rows, quants.quantize(np.ascontiguousarray(cols, np.float32), T[dt]))
        flash = gguf_flash.load(out, mode="dense", n_ctx=64)
        got = np.array([flash.model.forward(t, p).copy() for p, t in enumerate(toks)])
        drift[dt] = np.abs(got - ref).max()
    assert drift["Q8_0"] < drift["Q5_0"] < drift["Q4_0"], drift


def test_flash_mode_quality_and_stats(smollm2_flash, smollm2_ref):
    """Flash mode (exact gate selection at the file's sparsity) keeps llama.cpp's top-1 among its top 2
    at the end of every prompt where llama.cpp's margin is clear, and reports per-token statistics.
    (Top 2, not top 1: at this fixture's sparsity 0.3 the flash model's own margin on "story" is 0.44
    where llama.cpp's is 1.25, and a chunked prompt's rounding may swap the two.)"""
    path, _ = smollm2_flash
    llm = gguf_flash.load(path, n_ctx=128, selector="gate")
    for p in smollm2_ref["prompts"][:3]:
        logits = llm.model.prefill(p["tokens_add_special"], 0)
        if p["greedy_top1_top2_margin"][0] >= 1.0:
            assert p["greedy_ids"][0] in np.argsort(logits)[-2:], p["id"]
    first, c = llm.model.prompt_stats[0], llm.model.prompt_stats[-1]   # each prompt ran as one chunk
    n_ff, L = llm.cfg.n_ff, llm.cfg.n_layer
    # the cold window loads; by the third prompt the window (all bundles fit) may already hold every one
    assert first.loaded > 0 and first.bytes_read > 0
    assert c.tokens == len(smollm2_ref["prompts"][2]["tokens_add_special"])
    assert c.io_ms >= 0 and c.compute_ms > 0
    llm.model.forward(17, c.tokens)                # a decode step: per-token statistics
    s = llm.model.stats[-1]
    assert 0 < s.predicted < n_ff * L and s.active == s.predicted
    assert 0.0 <= s.hit_rate <= 1.0 and s.io_ms >= 0 and s.compute_ms > 0 and s.rss > 0


def test_product_selector_at_threshold_zero_is_the_dense_ffn(smollm2_flash):
    """The product selector with every threshold at 0 chooses every neuron whose value is not zero and
    adds value x down for them: each layer's FFN equals dense mode's up to float rounding (2e-7 of its
    largest output). Whole tokens are compared by KL only: each layer's input is rounded to 8-bit blocks,
    so across 30 layers such differences flip a few codes (logits within ~3% of their largest)."""
    from gguf_flash.flash.stats import TokenStats
    path, _ = smollm2_flash
    dense = gguf_flash.load(path, n_ctx=64, mode="dense")
    prod = gguf_flash.load(path, n_ctx=64, selector="product")
    assert prod.model.selector == "product" and "gate and up rows" in prod.model.plan.resident
    for l in prod.model.info.layers:
        l.prod_threshold = 0.0
    prod.model._step, prod.model._post = prod.model._step_arguments()   # the decode step reads them at load
    x = np.random.default_rng(0).standard_normal(dense.cfg.n_embd).astype(np.float32)
    for il in (0, 7, 29):
        outs = []
        for m in (dense.model, prod.model):
            m.st.xb[:] = x
            out, n, _ = decode_ffn(m, il, 0, TokenStats(), threshold=np.float32(0))
            outs.append(out)
        assert n == prod.cfg.n_ff
        np.testing.assert_allclose(outs[1], outs[0], atol=1e-6 * np.abs(outs[0]).max())
    for p, t in enumerate([1, 504, 3458, 30, 1000]):
        a, b = dense.model.forward(t, p).astype(np.float64), prod.model.forward(t, p).astype(np.float64)
        assert _kl(a, b) < 0.02
    assert prod.model.stats[-1].active > 0.99 * prod.cfg.n_ff * prod.cfg.n_layer


def test_product_selector_computes_what_the_converter_measured(smollm2_flash, smollm2_path):
    """The converter chose the product thresholds by the dense engine's held-out perplexity with the
    same criterion (model.Weights.ffn_scale, nn.glu_product); flash mode with --selector product must
    compute that model: the source model under those thresholds and the flash file's prompt logits agree
    (the flash path rounds its input to 8-bit blocks, so a few neurons near the threshold may flip)."""
    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.model import Model
    path, report = smollm2_flash
    assert report.prod_sparsity == 0.3 and len(report.prod_curve) == 2    # dense and the fixed sparsity
    flash = gguf_flash.load(path, n_ctx=128, selector="product")
    info = flash.model.info
    src = Model(GGUFFile(smollm2_path), n_ctx=128)
    scale = np.zeros((flash.cfg.n_layer, flash.cfg.n_ff), np.float32)
    for il, l in enumerate(info.layers):
        scale[il, l.neuron_id] = l.down_norm       # stored row order -> the source's neuron order
        src.w.thresholds[il] = l.prod_threshold
    src.w.ffn_scale = scale
    ids = flash.tokenize("The capital of France is Paris, and the capital of Germany is")
    want = src.prefill(ids, 0).astype(np.float64)
    got = flash.model.prefill(ids, 0).astype(np.float64)
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert _kl(want, got) < 0.05
    # and the criterion is not a no-op: about the file's sparsity of the neurons stays off
    flash.model.forward(17, len(ids))
    frac = flash.model.stats[-1].active / (flash.cfg.n_ff * flash.cfg.n_layer)
    assert 0.5 < frac < 0.9


def _kl(want, got) -> float:
    """KL(softmax(want) || softmax(got)) of two logit vectors."""
    p, q = np.exp(want - want.max()), np.exp(got - got.max())
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


def test_impossible_cap_is_refused_before_loading(smollm2_flash):
    path, _ = smollm2_flash
    with pytest.raises(RamCapError, match=r"needs at least \d+ MiB \(\d+ MiB runtime \+ \d+ MiB resident.*cap is 100 MiB") as e:
        gguf_flash.load(path, max_ram="100M")
    assert e.value.need > 100 << 20
    proc = subprocess.run([sys.executable, "-m", "gguf_flash.cli", "run", "-m", str(path), "--max-ram", "100M",
                           "-p", "hi", "-n", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs at least" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_changed_file_is_detected(smollm2_flash, tmp_path):
    path, _ = smollm2_flash
    copy = tmp_path / "copy.flash.gguf"
    copy.write_bytes(path.read_bytes())
    llm = gguf_flash.load(copy, n_ctx=64)
    llm.model.forward(5, 0)
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(FlashFormatError, match="changed"):
        llm.model.forward(6, 1)


RUN_UNDER_CAP = r"""
import sys, gguf_flash
llm = gguf_flash.load(sys.argv[1], max_ram=sys.argv[2], n_ctx=400, n_threads=2)
print("READY", flush=True)
res = llm.generate("Once upon a time", n_predict=300, ignore_eos=True)
print("TOKENS", len(res.tokens), "MAXRSS", max(s.rss for s in llm.model.stats), flush=True)
"""


MIN_CAP = r"""
import sys, gguf_flash
try:
    gguf_flash.load(sys.argv[1], max_ram="1M", n_ctx=400, n_threads=2)
except gguf_flash.RamCapError as e:
    print(e.need >> 20)
"""


DENSE_PEAK = r"""
import sys, gguf_flash
llm = gguf_flash.load(sys.argv[1], n_threads=2)
llm.generate("Once upon a time", n_predict=50, ignore_eos=True)
"""


def test_300_tokens_under_dense_peak_minus_40_percent_of_the_file(smollm2_path, smollm2_flash):
    """The product's claim: flash mode runs in less RAM than the dense engine needs. The dense engine's
    own peak RSS on the source SmolLM2 (50 tokens, sampled from outside every 5 ms) minus 40% of the
    source file is the cap; a second process samples the flash process's RSS every 5 ms through 300
    tokens: the maximum stays under the cap, and the cap is above the smallest the plan accepts."""
    path, _ = smollm2_flash
    dense = subprocess.Popen([sys.executable, "-c", DENSE_PEAK, str(smollm2_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    dense_peak = sample_peak_rss(dense, every=0.005)
    assert dense.wait(timeout=300) == 0
    cap_mib = int((dense_peak - 0.4 * os.path.getsize(smollm2_path)) / 2**20)
    need = subprocess.run([sys.executable, "-c", MIN_CAP, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert int(need.stdout.strip()) < cap_mib, (need.stdout, need.stderr[-500:], cap_mib)
    proc = subprocess.Popen([sys.executable, "-c", RUN_UNDER_CAP, str(path), f"{cap_mib}M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = sample_peak_rss(proc, every=0.005)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "TOKENS 300" in out, out
    print(f"dense peak {dense_peak / 2**20:.1f} MiB; flash peak sampled from outside {peak / 2**20:.1f} MiB, "
          f"cap {cap_mib} MiB")
    assert peak <= cap_mib << 20


CAP_IDENTITY = r"""
import sys, json, numpy as np, gguf_flash
path, out, capped = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cap = None
if capped:
    try:
        gguf_flash.load(path, max_ram="1M", n_ctx=64, selector="gate")
    except gguf_flash.RamCapError as e:
        cap = e.need + (5 << 20)   # a second load in this process measures its runtime a little higher (3 MiB seen)
llm = gguf_flash.load(path, max_ram=cap, n_ctx=64, selector="gate", n_threads=2)
ids = llm.tokenize("The capital of France is")
logits = np.stack([llm.model.forward(t, p).copy() for p, t in enumerate(ids + [504, 3458, 30, 1000])])
np.save(out, logits)
print(json.dumps(dict(overflow=sum(s.overflow for s in llm.model.stats), head=llm.model.plan.head,
                      slots=sum(llm.model.plan.capacities))))
"""


def test_logits_at_the_smallest_cap_equal_those_with_everything_resident(smollm2_flash, tmp_path):
    """The window is a cache, not a requirement: at the smallest accepted cap most chosen neurons do not
    fit it and are streamed through the staging buffer, and the logits are bitwise those of a run that
    holds every bundle (positions are summed in the same order at any cap)."""
    import json
    path, _ = smollm2_flash
    runs = {}
    for capped in (True, False):
        out = subprocess.run([sys.executable, "-c", CAP_IDENTITY, str(path), str(tmp_path / f"c{int(capped)}.npy"),
                              "1" if capped else "0"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[capped] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs[True]["overflow"] > 0 and runs[False]["overflow"] == 0
    assert runs[True]["head"] in ("streamed", "indexed") and runs[False]["head"] == "resident"
    np.testing.assert_array_equal(np.load(tmp_path / "c1.npy"), np.load(tmp_path / "c0.npy"))


@pytest.mark.parametrize("selector", ["gate", "predictor", "product"])
def test_overflow_streaming_with_a_window_of_one_slot(smollm2_flash, selector):
    """Every layer's window shrunk to a single slot: all but one chosen neuron per layer go through the
    staging buffer in chunks, and the logits equal those of the full window."""
    path, _ = smollm2_flash
    toks = [1, 504, 3458, 30, 1000, 17]
    full = gguf_flash.load(path, n_ctx=64, selector=selector)
    want = np.stack([full.model.forward(t, p).copy() for p, t in enumerate(toks)])
    one = gguf_flash.load(path, n_ctx=64, selector=selector)
    for w in one.model.windows:
        w.shrink(1)
    got = np.stack([one.model.forward(t, p).copy() for p, t in enumerate(toks)])
    assert all(w.capacity == 1 for w in one.model.windows)
    assert min(s.overflow for s in one.model.stats) > 0
    assert all(s.overflow == 0 for s in full.model.stats)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode,selector", [("flash", "bundle"), ("dense", "auto"), ("flash", "gate"),
                                           ("flash", "product"), ("flash", "predictor")])
def test_one_call_per_token_while_nothing_is_read(smollm2_flash, mode, selector, monkeypatch):
    """Without a cap a token's layers run in one compiled call (flashstep.layers_held) up to a layer
    with rows to read, which Python reads and computes before calling again from the next layer: bundle
    rows and dense mode once the windows hold every row, each selector as soon as its rows are held.
    The logits and the rows read are bitwise those of the per-layer calls, also after a window is
    shrunk to 10 slots (its layer then reads every token) and after another grows past its slots
    (reallocated: the one call's cached arguments must take the new ones)."""
    from gguf_flash.kernels import flashstep
    path, _ = smollm2_flash
    toks = [1, 504, 3458, 30, 1000, 17, 42, 7]
    calls = []
    real = flashstep.layers_held
    monkeypatch.setattr(flashstep, "layers_held", lambda *a: calls.append(a[-5]) or real(*a))
    runs = {}
    for name in ("per layer", "held"):
        llm = gguf_flash.load(path, n_ctx=64, mode=mode, selector=selector)
        calls.clear()                                  # the load's own (kernel preloading)
        if name == "per layer":
            monkeypatch.setattr(llm.model, "_held", lambda: None)
        logits = [llm.model.forward(t, p).copy() for p, t in enumerate(toks[:-2])]
        llm.model.windows[3].shrink(10)
        logits.append(llm.model.forward(toks[-2], len(toks) - 2).copy())
        grown = llm.model.windows[5]
        before = grown.slots
        grown.set_capacity(grown.capacity + 64)
        assert grown.slots is not before
        logits.append(llm.model.forward(toks[-1], len(toks) - 1).copy())
        runs[name] = (np.stack(logits), [(s.active, s.loaded) for s in llm.model.stats])
    np.testing.assert_array_equal(runs["held"][0], runs["per layer"][0])
    assert runs["held"][1] == runs["per layer"][1]
    assert runs["held"][1][-2][1] > 0                  # the shrunk window read rows
    assert calls.count(0) == len(toks)                 # every token starts with one call from layer 0
    if selector in ("bundle", "auto"):   # one call a token, and one more after the shrunk window's layer
        fill = 29 if mode == "flash" else 0   # (two tokens); bundle rows: the first token's layers each read
        assert len(calls) == calls.count(0) + fill + 2


STREAMED = r"""
import sys, json, numpy as np, gguf_flash
path, cold, out, capped = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4] == "1"
cap = None
if capped:
    try:
        gguf_flash.load(path, max_ram="1M", n_ctx=64, mode="naive")
    except gguf_flash.RamCapError as e:
        cap = f"{(e.need >> 20) + 12}M"
llm = gguf_flash.load(path, max_ram=cap, n_ctx=64, mode="naive", cold=cold)
logits = np.stack([llm.model.forward(t, p).copy() for p, t in enumerate([1, 504, 3458, 30])])
np.save(out, logits)
print(json.dumps(dict(streamed=llm.model.plan.head_streamed, head_bytes=int(llm.model.w.output[1] * llm.model.w.output[2]),
                      bytes=[s.bytes_read for s in llm.model.stats])))
"""


@pytest.mark.parametrize("cold", [False, True])
def test_streamed_head_equals_resident_head(smollm2_flash, tmp_path, cold):
    """Near the smallest cap the plan accepts, the output head does not fit and is streamed through the
    store (O_DIRECT when cold) in chunks: its reads count as I/O, and the logits equal those of the same
    mode with a resident head (to float rounding). Each side runs in a fresh process: RSS, and so the
    plan, is the whole process's."""
    import json
    path, _ = smollm2_flash
    runs = {}
    for capped in (True, False):
        out = subprocess.run([sys.executable, "-c", STREAMED, str(path), "1" if cold else "0",
                              str(tmp_path / f"l{int(capped)}.npy"), "1" if capped else "0"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[capped] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs[True]["streamed"] and not runs[False]["streamed"]
    # equal up to float rounding (the resident head is one fused call, with its own RMSNorm order)
    np.testing.assert_allclose(np.load(tmp_path / "l1.npy"), np.load(tmp_path / "l0.npy"), rtol=1e-5, atol=1e-4)
    for streamed_bytes, resident_bytes in zip(runs[True]["bytes"], runs[False]["bytes"]):
        assert streamed_bytes - resident_bytes >= runs[True]["head_bytes"]


NO_NEW_KERNELS = r"""
import sys, json, numba, importlib, pkgutil, gguf_flash
import gguf_flash.kernels as K
path, extra, mode, selector, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
try:
    gguf_flash.load(path, max_ram="1M", n_ctx=64, mode=mode, selector=selector, logit_rows=rows)
except gguf_flash.RamCapError as e:
    cap = f"{(e.need >> 20) + extra}M"
def signatures():
    out = set()
    for m in pkgutil.iter_modules(K.__path__):
        mod = importlib.import_module("gguf_flash.kernels." + m.name)
        for name in dir(mod):
            d = getattr(mod, name)
            if isinstance(d, numba.core.registry.CPUDispatcher):
                out |= {(m.name, name, str(sig)) for sig in d.signatures}
    return out
llm = gguf_flash.load(path, max_ram=cap, n_ctx=64, mode=mode, selector=selector, logit_rows=rows)
before = signatures()
llm.generate(llm.tokenize("The capital of France is"), n_predict=6, ignore_eos=True)
if rows:   # every position's logits, as perplexity asks them
    assert len(list(llm.model.prefill(llm.tokenize("The capital of France is Paris, and"), 0, logits_rows="all")))
print(json.dumps(dict(new=sorted(map(list, signatures() - before)), streamed=llm.model.plan.head_streamed,
                      selector=llm.model.selector)))
"""


@pytest.mark.parametrize("cap_extra,mode,selector,rows", [(200, "flash", "gate", 0), (8, "flash", "predictor", 0),
                                                          (200, "flash", "product", 0), (200, "flash", "bundle", 0),
                                                          (8, "naive", "auto", 0), (200, "flash", "gate", 16),
                                                          (8, "naive", "auto", 16)])
def test_nothing_compiles_after_the_plan(smollm2_flash, cap_extra, mode, selector, rows):
    """FlashModel loads every kernel the token loop uses before it measures its own RSS (and, on a fresh
    clone, compiles them in a child process first), so no kernel is compiled or loaded under the cap:
    generating adds no compiled signature, with a resident or a streamed head and either selector."""
    import json
    path, _ = smollm2_flash
    out = subprocess.run([sys.executable, "-c", NO_NEW_KERNELS, str(path), str(cap_extra), mode, selector, str(rows)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["new"] == []
    assert r["streamed"] == (cap_extra < 20)     # 8 MiB over the minimum: the head does not fit


NO_O_DIRECT = r"""
import os, sys
from gguf_flash.cli import main
real_open = os.open
def refuse_direct(path, flags, *a, **kw):   # what tmpfs before Linux 6.6 (and some FUSE filesystems) do
    if flags & os.O_DIRECT:
        raise OSError(22, "Invalid argument")
    return real_open(path, flags, *a, **kw)
os.open = refuse_direct
sys.exit(main(sys.argv[1:]))
"""


def test_stats_say_how_cold_reads_bypass_the_page_cache(tmp_path):
    """`run --cold --stats` names the cold-read mechanism: O_DIRECT, or posix_fadvise(DONTNEED) where the
    filesystem refuses O_DIRECT. The file sits on /dev/shm (tmpfs): tmpfs refused O_DIRECT before Linux 6.6
    and accepts it since, so that run's line must be whatever the store finds on this kernel; a run whose
    os.open refuses O_DIRECT must report the fallback."""
    from gguf_flash.flash.store import BundleStore
    from gguf_flash.synthetic import write_synthetic
    shm = Path("/dev/shm")
    assert shm.is_dir()
    src = write_synthetic(tmp_path / "t.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                          n_head_kv=2, n_vocab=300, n_ctx=256, qtype="Q8_0", seed=5)
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(f"w{i % 50} x{i % 7}" for i in range(3000)))
    path = shm / f"gguf-flash-test-{os.getpid()}.flash.gguf"
    try:
        gguf_flash.convert(src, path, calib=calib, calib_tokens=512, sparsity=0.5, rank=8)
        with BundleStore(path, 0, 4096, 1, cold=True) as probe:
            expected = probe.read_mode()
        args = ["run", "-m", str(path), "--mode", "naive", "-p", "w1 x2", "-n", "3", "--temp", "0", "-t", "1",
                "-q", "--stats"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        lines = {}
        for name, launcher, extra in [("kernel", [sys.executable, "-m", "gguf_flash.cli"], ["--cold"]),
                                      ("refused", [sys.executable, "-c", NO_O_DIRECT], ["--cold"]),
                                      ("warm", [sys.executable, "-m", "gguf_flash.cli"], [])]:
            proc = subprocess.run(launcher + args + extra, capture_output=True, text=True, env=env, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            lines[name] = [line for line in proc.stderr.splitlines() if "reads:" in line]
    finally:
        path.unlink(missing_ok=True)
    assert lines["kernel"] == [expected]
    assert expected in ("cold reads: O_DIRECT",
                        "cold reads: posix_fadvise(DONTNEED) (O_DIRECT refused by the filesystem)")
    assert lines["refused"] == ["cold reads: posix_fadvise(DONTNEED) (O_DIRECT refused by the filesystem)"]
    assert lines["warm"] == ["reads: through the page cache (--cold bypasses it)"]
