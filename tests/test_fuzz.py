"""Fuzzed GGUF and flash-GGUF files (issue 16): every case ends in a gguf_flash exception (CLI: one
line on stderr, exit 2) within seconds, never another exception type, a hang, a crash of the
interpreter, or an allocation larger than the file. Deterministic: every mutation comes from a seeded
generator. Cases run in child processes (tests/fuzz_child.py), a few hundred per child.

Kinds: bit flips in the header, the metadata and the tensor infos; counts, string and array lengths set
to 0, 2^31, 2^63, 2^64-1; metadata values out of range (hyperparameters, token ids, NaN floats);
tensor offsets, dims and types out of range or overlapping; files cut at every region boundary; a
flash file whose bundle tensors, thresholds and predictor shapes disagree with its metadata.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fuzz_gguf import Case, bad_results, flip_bit, layout, put_uint, rewrite, rng_for, run_cases, summarize

SIZES = (0, 1 << 31, 1 << 63, (1 << 64) - 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-layer gpt2-tokenizer llama (27 KB) and a gemma3 with a SentencePiece vocabulary."""
    from gguf_flash.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("fuzzsrc")
    llama = write_synthetic(d / "llama.gguf", n_layer=1, n_embd=32, n_ff=64, n_head=2, n_head_kv=1,
                            n_vocab=300, n_ctx=64, seed=3)
    gemma = write_synthetic(d / "gemma.gguf", arch="gemma3", n_layer=1, n_embd=32, n_ff=64, n_head=2,
                            n_head_kv=1, n_vocab=300, n_ctx=64, seed=4, tokenizer="llama", sliding_window=16)
    return {"llama": llama, "gemma": gemma}


# ---- case generators ------------------------------------------------------------------------------

def bitflip_cases(name, path, rng, n_header=12, n_meta=40, n_ti=30):
    data, lay = path.read_bytes(), layout(path)
    cases = []
    regions = [("header", 0, 24, n_header), ("meta", *lay.kv_region, n_meta), ("tinfo", *lay.ti_region, n_ti)]
    for region, lo, hi, n in regions:
        for bit in sorted(rng.choice(np.arange(lo * 8, hi * 8), size=n, replace=False)):
            buf = bytearray(data)
            flip_bit(buf, int(bit))
            cases.append(Case(f"{name}-flip-{region}-{bit}", f"bitflip {region}", bytes(buf),
                              expect_error=False))
    return cases


def length_cases(name, path, rng):
    """Counts, string and array lengths, n_dims and dims set to each of SIZES: every header count and
    array length, a sample of the string lengths (keys, values, vocabulary entries) and tensor dims."""
    data, lay = path.read_bytes(), layout(path)
    parts = lay.find("count") + lay.find("arraylen")
    for role, n in (("strlen", 8), ("ndims", 3), ("dim", 5)):
        pool = lay.find(role)
        parts += [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    cases = []
    for part in parts:
        for v in SIZES:
            buf = bytearray(data)
            put_uint(buf, part, v)
            if bytes(buf) != data:
                cases.append(Case(f"{name}-len-{part.label.replace(' ', '_')}-{v}", f"length {part.role}",
                                  bytes(buf)))
    return cases


def tensor_cases(name, path, rng, n_tensors=5):
    """Tensor offsets out of range, unaligned or overlapping; types unknown or inconsistent."""
    data, lay = path.read_bytes(), layout(path)
    offsets = {p.label.split()[1]: p for p in lay.find("toffset")}
    types = {p.label.split()[1]: p for p in lay.find("ttype")}
    names = list(offsets)
    picked = sorted(rng.choice(len(names), size=min(n_tensors, len(names)), replace=False))
    cases = []
    for i in picked:
        t = names[i]
        rel = struct.unpack_from("<Q", data, offsets[t].start)[0]
        other = struct.unpack_from("<Q", data, offsets[names[(i + 1) % len(names)]].start)[0]
        for label, v in [("eof", lay.size), ("huge", 1 << 62), ("neg", (1 << 64) - 32), ("unaligned", rel + 1),
                         ("overlap", other)]:
            if v == rel:
                continue
            buf = bytearray(data)
            put_uint(buf, offsets[t], v)
            cases.append(Case(f"{name}-ti-{t}-offset-{label}", "tensor offset", bytes(buf)))
        qt = struct.unpack_from("<I", data, types[t].start)[0]
        for label, v in [("unknown", 99), ("huge", 1 << 31), ("f32", 0), ("q4k", 12), ("i8", 24)]:
            if v == qt:
                continue
            buf = bytearray(data)
            put_uint(buf, types[t], v)
            # a weight turned F32 can still fit before the next tensor (a flash file pads to 4096): a
            # valid file, then it must run
            cases.append(Case(f"{name}-ti-{t}-type-{label}", "tensor type", bytes(buf), expect_error=label != "f32"))
    return cases


# keys for which any of these values describes a model that can run: special token ids out of range are
# ignored with a warning (llama.cpp: "bad special token ... using default id"), vocab_size 0 means
# "count the tokens", any context length or sliding window is a valid (if odd) model
TOLERANT = ("token_id", "context_length", "sliding_window", "vocab_size-zero")


def value_cases(name, path):
    """Hyperparameters, token ids and floats set out of range (the file stays well-formed)."""
    data, lay = path.read_bytes(), layout(path)
    cases = []
    for key, parts in lay.kv_values.items():
        if len(parts) != 1 or parts[0].role != "value" or key.startswith("general."):
            continue
        p = parts[0]
        if p.dtype == "uint32":
            values = [("zero", 0), ("one", 1), ("2^31", 1 << 31), ("max", (1 << 32) - 1)]
            for label, v in values:
                buf = bytearray(data)
                put_uint(buf, p, v)
                if bytes(buf) != data:
                    cid = f"{name}-val-{key}-{label}"
                    cases.append(Case(cid, "metadata value", bytes(buf),
                                      expect_error=not any(k in cid for k in TOLERANT)))
        elif p.dtype == "float32":
            for label, v in [("nan", float("nan")), ("inf", float("inf")), ("zero", 0.0), ("neg", -1.0)]:
                buf = bytearray(data)
                struct.pack_into("<f", buf, p.start, v)
                cases.append(Case(f"{name}-val-{key}-{label}", "metadata value", bytes(buf)))
    return cases


def truncation_cases(name, path):
    """The file cut at every region boundary: inside the header fields, at each key/value and its value,
    each tensor info, the data start, and each tensor's first and last byte."""
    data, lay = path.read_bytes(), layout(path)
    end = max(s + n for _, s, n in lay.tensor_data)     # the file may end in padding: cuts stop before
    cuts = {1, 4, 8, 12, 16, 23, 24, lay.kv_region[1], lay.ti_region[1], lay.data_start - 1, end - 1}
    cuts |= {s for s, _ in lay.kv_starts} | {s for s, _ in lay.ti_starts}
    cuts |= {p.start for p in lay.parts if p.label.endswith((" vtype", " itype", " arraylen"))}
    cuts |= {s for _, s, _ in lay.tensor_data} | {s + n - 1 for _, s, n in lay.tensor_data}
    return [Case(f"{name}-cut-{c}", "truncated", data[:c]) for c in sorted(cuts) if 0 < c < end]


def all_cases(tiny):
    rng = rng_for(16)
    cases = []
    for name, path in tiny.items():
        cases += bitflip_cases(name, path, rng) + length_cases(name, path, rng) + tensor_cases(name, path, rng) \
            + value_cases(name, path) + truncation_cases(name, path)
    return cases


def test_fuzzed_gguf_files(tiny, tmp_path):
    cases = all_cases(tiny)
    warm = [(p, "load", {}) for p in tiny.values()]
    results = run_cases(cases, tmp_path, warm)
    size = max(p.stat().st_size for p in tiny.values())
    table = summarize(cases, results)
    print("\n".join(f"{k}: {v}" for k, v in sorted(table.items())))
    bad = bad_results(cases, results, alloc_limit=size + (4 << 20))
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(map(str, bad[:60]))


# ---- tokenizer metadata of the wrong type or shape ------------------------------------------------------

def tokenizer_cases(tiny, workdir):
    """Well-formed GGUFs whose tokenizer keys hold the wrong types or disagree with each other. Values a
    tokenizer tolerates (unknown token types, NaN scores, merges that are not tokens, ids outside the
    vocabulary: llama.cpp ignores them too) must still run."""
    from gguf import GGUFValueType as V
    from gguf_flash.gguf_file import GGUFFile
    A = V.ARRAY
    workdir.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, path in tiny.items():
        f = GGUFFile(path)
        tokens, n = list(f.get("tokenizer.ggml.tokens")), len(f.get("tokenizer.ggml.tokens"))
        has = set(f.meta)
        f.close()
        variants = {
            "types-short": ("tokenizer.ggml.token_type", ([1] * 10, A, V.INT32), True),
            "types-strings": ("tokenizer.ggml.token_type", (["x"] * n, A, V.STRING), True),
            "types-unknown": ("tokenizer.ggml.token_type", ([99] * n, A, V.INT32), False),
            "scores-short": ("tokenizer.ggml.scores", ([0.0] * 10, A, V.FLOAT32), True),
            "scores-nan": ("tokenizer.ggml.scores", ([float("nan")] * n, A, V.FLOAT32), False),
            "model-int": ("tokenizer.ggml.model", (3, V.UINT32, None), True),
            "model-unknown": ("tokenizer.ggml.model", ("bert", V.STRING, None), True),
            "pre-int": ("tokenizer.ggml.pre", (5, V.UINT32, None), True),
            "merges-ints": ("tokenizer.ggml.merges", ([1, 2, 3], A, V.UINT32), True),
            "merges-garbage": ("tokenizer.ggml.merges", (["a", "", "x y z", "\x00 \x00"], A, V.STRING), False),
            "tokens-ints": ("tokenizer.ggml.tokens", (list(range(n)), A, V.INT32), True),
            "tokens-dup": ("tokenizer.ggml.tokens", ([tokens[5]] * n, A, V.STRING), True),
            "tokens-short": ("tokenizer.ggml.tokens", (tokens[:-1], A, V.STRING), True),
            "bos-string": ("tokenizer.ggml.bos_token_id", ("1", V.STRING, None), True),
            "eos-array": ("tokenizer.ggml.eos_token_id", ([1, 2], A, V.UINT32), True),
            "eos-outside": ("tokenizer.ggml.eos_token_id", (1 << 31, V.UINT32, None), False),
            "add-bos-string": ("tokenizer.ggml.add_bos_token", ("yes", V.STRING, None), True),
            "template-int": ("tokenizer.chat_template", (5, V.UINT32, None), True),
        }
        for label, (key, value, error) in variants.items():
            if key not in has:
                continue
            out = rewrite(path, workdir / f"{name}-{label}.gguf", meta={key: value})
            cases.append(Case(f"{name}-tok-{label}", "tokenizer metadata", out.read_bytes(), expect_error=error))
    return cases


def test_fuzzed_tokenizer_metadata(tiny, tmp_path):
    cases = tokenizer_cases(tiny, tmp_path / "variants")
    results = run_cases(cases, tmp_path / "run", [(p, "load", {}) for p in tiny.values()])
    print(summarize(cases, results))
    bad = bad_results(cases, results, alloc_limit=max(p.stat().st_size for p in tiny.values()) + (4 << 20))
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(map(str, bad))


# ---- flash files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    """A two-layer synthetic llama converted with a short calibration (about 6 s)."""
    from gguf_flash.flash.convert import convert
    from gguf_flash.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("fuzzflash")
    src = write_synthetic(d / "src.gguf", n_layer=2, n_embd=32, n_ff=64, n_head=2, n_head_kv=1, n_vocab=300,
                          n_ctx=128, seed=5)
    return Path(convert(src, d / "tiny.flash.gguf", calib_tokens=256, sparsity=0.5, rank=4).out)


def flash_cases(path, workdir, rng):
    """Flash files that are well-formed GGUFs whose flash keys and tensors disagree with each other,
    plus bit flips and cuts of the flash file itself."""
    from gguf import GGUFValueType as V
    from gguf_flash.flash import format as ff
    from gguf_flash.gguf_file import GGUFFile
    workdir.mkdir(parents=True, exist_ok=True)
    f = GGUFFile(path)
    n_ff, thr = f.tensors[ff.t_neuron_id(0)].ne[0], list(f.meta[ff.K_THRESHOLD])
    a, b = np.array(f.array(ff.t_pred_a(0))), np.array(f.array(ff.t_pred_b(0)))
    bundle, nid = np.array(f.raw(ff.t_bundle(0))), np.array(f.array(ff.t_neuron_id(0)))
    types, nbytes = list(f.meta[ff.K_TYPES]), list(f.meta[ff.K_BYTES])
    f.close()
    A, U, F = V.ARRAY, V.UINT32, V.FLOAT32
    dup = nid.copy()
    dup[1] = dup[0]
    variants = {
        "threshold-nan": dict(meta={ff.K_THRESHOLD: ([float("nan")] + thr[1:], A, F)}),
        "threshold-inf": dict(meta={ff.K_THRESHOLD: ([float("inf")] + thr[1:], A, F)}),
        "threshold-neg": dict(meta={ff.K_THRESHOLD: ([-1.0] + thr[1:], A, F)}),
        "threshold-short": dict(meta={ff.K_THRESHOLD: (thr[:1], A, F)}),
        "threshold-strings": dict(meta={ff.K_THRESHOLD: (["x", "y"], A, V.STRING)}),
        "offset-nan": dict(meta={ff.K_PRED_OFFSET: ([float("nan")] * len(thr), A, F)}),
        "kind-7": dict(meta={ff.K_PRED_KIND: ([7] * len(thr), A, U)}),
        "types-99": dict(meta={ff.K_TYPES: ([99] + types[1:], A, U)}),
        "types-f32": dict(meta={ff.K_TYPES: ([0] + types[1:], A, U)}),
        "bytes-off": dict(meta={ff.K_BYTES: ([nbytes[0] + 1] + nbytes[1:], A, U)}),
        "bytes-huge": dict(meta={ff.K_BYTES: ([1 << 31] + nbytes[1:], A, U)}),
        "version-2": dict(meta={ff.K_VERSION: (2, U, None)}),
        "version-string": dict(meta={ff.K_VERSION: ("1", V.STRING, None)}),
        "activation-unknown": dict(meta={ff.K_ACTIVATION: ("swish", V.STRING, None)}),
        "activation-int": dict(meta={ff.K_ACTIVATION: (3, U, None)}),
        "sparsity-nan": dict(meta={ff.K_SPARSITY: (float("nan"), F, None)}),
        "sparsity-2": dict(meta={ff.K_SPARSITY: (2.0, F, None)}),
        "layer-sparsity-short": dict(meta={ff.K_LAYER_SPARSITY: ([0.5], A, F)}),
        "layer-sparsity-nan": dict(meta={ff.K_LAYER_SPARSITY: ([float("nan")] * len(thr), A, F)}),
        "bundle-rows": dict(tensors={ff.t_bundle(0): (bundle[:-1].view(np.int8), None)}),
        "bundle-cols": dict(tensors={ff.t_bundle(0): (bundle[:, :-32].view(np.int8), None)}),
        "bundle-f32": dict(tensors={ff.t_bundle(0): (np.zeros(bundle.shape, np.float32), None)}),
        "bundle-missing": dict(drop=(ff.t_bundle(1),)),
        "neuron-dup": dict(tensors={ff.t_neuron_id(0): (dup, None)}),
        "neuron-short": dict(tensors={ff.t_neuron_id(0): (nid[:-1], None)}),
        "neuron-f32": dict(tensors={ff.t_neuron_id(0): (nid.astype(np.float32), None)}),
        "neuron-range": dict(tensors={ff.t_neuron_id(0): (nid + (1 << 30), None)}),
        "freq-short": dict(tensors={ff.t_freq(0): (np.ones(n_ff - 1, np.float32), None)}),
        "freq-nan": dict(tensors={ff.t_freq(0): (np.full(n_ff, np.nan, np.float32), None)}),
        "pred-a-rows": dict(tensors={ff.t_pred_a(0): (a[:-1], None)}),
        "pred-a-f32": dict(tensors={ff.t_pred_a(0): (a.astype(np.float32), None)}),
        "pred-a-q8": dict(tensors={ff.t_pred_a(0): (np.zeros((a.shape[0], 34), np.uint8), 8)}),
        "pred-a-nan": dict(tensors={ff.t_pred_a(0): (np.full_like(a, np.nan), None)}),
        "pred-b-rank": dict(tensors={ff.t_pred_b(0): (np.concatenate([b, b[:1]]), None)}),
        "pred-b-cols": dict(tensors={ff.t_pred_b(0): (b[:, :-1], None)}),
        "pred-bias-short": dict(tensors={ff.t_pred_bias(0): (np.zeros(n_ff - 1, np.float32), None)}),
        "pred-missing": dict(drop=(ff.t_pred_b(1),)),
        "key-missing": dict(drop=(ff.K_PRED_KIND,)),
    }
    cases = []
    for label, kw in variants.items():
        out = rewrite(path, workdir / f"v-{label}.gguf", **kw)
        cases.append(Case(f"flash-{label}", "flash disagrees", out.read_bytes()))
    cases += [Case(c.id.replace("flash-", "flash-raw-", 1), "flash " + c.kind, c.data, expect_error=c.expect_error)
              for c in bitflip_cases("flash", path, rng, n_header=4, n_meta=30, n_ti=20)
              + tensor_cases("flash", path, rng, n_tensors=4)]
    cuts = truncation_cases("flash", path)
    cases += [cuts[i] for i in sorted(rng.choice(len(cuts), size=min(25, len(cuts)), replace=False))]
    return cases


def test_fuzzed_flash_files(tiny_flash, tmp_path):
    cases = flash_cases(tiny_flash, tmp_path / "variants", rng_for(17))
    results = run_cases(cases, tmp_path / "run", [(tiny_flash, "load", {})])
    table = summarize(cases, results)
    print("\n".join(f"{k}: {v}" for k, v in sorted(table.items())))
    bad = bad_results(cases, results, alloc_limit=tiny_flash.stat().st_size + (4 << 20))
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(map(str, bad[:60]))


# ---- a string array of >= 4096 entries (the compiled offset scan) -----------------------------------

@pytest.mark.parametrize("length", [
    pytest.param(1 << 40, id="2^40"),
    pytest.param((1 << 63) + 5, id="2^63+5"),
    pytest.param((1 << 63) - 16, id="2^63-16"),   # pos + n wrapped around here (a segfault) before
])
def test_long_vocabulary_string_length(tmp_path, length):
    from gguf_flash.synthetic import write_synthetic
    path = write_synthetic(tmp_path / "v.gguf", n_layer=1, n_embd=32, n_ff=64, n_head=2, n_head_kv=1,
                           n_vocab=4200, n_ctx=64, seed=3)
    part = next(p for p in layout(path).find("strlen") if p.label.endswith("tokens strlen 10"))
    buf = bytearray(path.read_bytes())
    put_uint(buf, part, length)
    path.write_bytes(bytes(buf))
    code = ("import sys; from gguf_flash.gguf_file import GGUFFile; from gguf_flash.errors import GGUFFormatError\n"
            "try:\n    GGUFFile(sys.argv[1])\nexcept GGUFFormatError as e:\n    print('refused:', e)")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "refused:" in proc.stdout and "string array" in proc.stdout, proc.stderr[-800:]


# ---- a sample through the command line ----------------------------------------------------------------

def test_cli_sample(tiny, tiny_flash, tmp_path):
    """Five fuzzed files through `gguf-flash run` / `inspect`: one line on stderr, exit code 2."""
    import os
    llama = all_cases({"llama": tiny["llama"]})
    picks = {c.id: c for c in llama if c.id in (
        "llama-cut-24", "llama-len-kv_tokenizer.ggml.tokens_arraylen-9223372036854775808",
        "llama-val-llama.attention.head_count-zero")}
    overlap = next(c for c in tensor_cases("llama", tiny["llama"], rng_for(1), n_tensors=8)
                   if c.id.endswith("offset-overlap"))
    picks[overlap.id] = overlap
    assert len(picks) == 4
    flash = flash_cases(tiny_flash, tmp_path / "variants", rng_for(17))
    nan = next(c for c in flash if c.id == "flash-threshold-nan")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = [(c, ["run", "-m", None, "-p", "hi", "-n", "2"]) for c in picks.values()] + [(nan, ["inspect", None])]
    for case, args in runs:
        path = tmp_path / f"{case.id}.gguf"
        path.write_bytes(case.data)
        args = [str(path) if a is None else a for a in args]
        proc = subprocess.run([sys.executable, "-c", "import sys; from gguf_flash.cli import main; sys.exit(main())",
                               *args], capture_output=True, text=True, timeout=120, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (case.id, proc.returncode, proc.stderr[-800:])
        assert lines[0].startswith("gguf-flash: error: ") and path.name in lines[0], (case.id, lines)
