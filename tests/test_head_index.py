"""The output head's index (issue 12): converter, format, runtime, plan."""

import numpy as np
import pytest

import gguf_flash
from gguf_flash.errors import FlashFormatError
from gguf_flash.flash import head_build
from gguf_flash.flash.head_index import EXACT, HeadNeed, need_for
from gguf_flash.flash.plan import PlanInput, make_plan
from gguf_flash.sampling import GREEDY, SamplingParams

MiB = 1 << 20


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A synthetic llama with a vocabulary much larger than its width (the head dominates, as in the
    models people run) converted with a rank-16 head index, and the same without one."""
    from gguf_flash.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("hidx")
    src = write_synthetic(d / "wide.gguf", arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                          n_vocab=4200, n_ctx=256, qtype="Q8_0", seed=3)
    calib = d / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} {i}" for i in range(6000)))
    out = d / "wide.flash.gguf"
    r = gguf_flash.convert(src, out, calib=calib, calib_tokens=1024, sparsity=0.3, rank=8, head_index_rank=16)
    plain = d / "plain.flash.gguf"
    gguf_flash.convert(src, plain, calib=calib, calib_tokens=1024, sparsity=0.3, rank=8, head_index=False)
    return out, plain, r


def _load(path, **kw):
    return gguf_flash.load(path, n_ctx=128, n_threads=2, mode="flash", **kw)


def test_converter_writes_and_reports_the_index(indexed):
    out, plain, r = indexed
    hi = r.head_index
    assert hi is not None and hi.rank == 16
    assert hi.preview.shape == (4200, 16) and hi.preview.dtype == np.int8
    assert 0 < hi.margin <= hi.margin_dist <= head_build.M_MAX + head_build.M_STEP
    assert hi.n_heldout > 0 and 0 < hi.read_frac <= hi.bytes_frac <= 1
    llm = _load(out)
    info = llm.model.info.head_index
    assert info["rank"] == 16 and info["margin"] == pytest.approx(hi.margin)
    assert info["margin_dist"] == pytest.approx(hi.margin_dist)
    assert np.array_equal(info["preview"], hi.preview)
    assert _load(plain).model.info.head_index is None


def _greedy_logits(llm, ids, n):
    """(tokens, logits of each step) of greedy decoding with the head need set as generation sets it."""
    m = llm.model
    m.set_head_need(need_for(GREEDY))
    toks, rows = [], []
    logits = m.prefill(ids, 0)
    for i in range(n):
        t = int(np.argmax(logits))
        toks.append(t)
        rows.append(logits.copy())
        logits = m.forward(t, len(ids) + i)
    m.set_head_need(EXACT)
    return toks, rows


def test_indexed_greedy_output_equals_the_whole_head(indexed):
    out, _, _ = indexed
    prompt = "word3 17 word5 word44 9"
    idx = _load(out, head="index")                 # the index, the head streamed
    exact = _load(out, head="exact")
    assert idx.model.plan.head == "indexed", idx.model.plan.describe()
    assert idx.model.indexed is not None and exact.model.indexed is None
    ids = idx.tokenize(prompt)
    a, la = _greedy_logits(idx, ids, 24)
    b, lb = _greedy_logits(exact, ids, 24)
    assert a == b
    st = idx.model.stats
    assert all(0 < s.head_rows <= 4200 for s in st)
    # rows read are exact: wherever the index read a row, its logit equals the whole head's
    for x, y in zip(la, lb):
        read = np.isclose(x, y, rtol=0, atol=1e-4)
        assert read[int(np.argmax(y))]
        assert read.sum() < len(y)


def test_infinite_margin_reads_every_row_and_equals_exact(indexed):
    out, _, _ = indexed
    llm, exact = _load(out, head="index"), _load(out, head="exact")
    llm.model.indexed.margin = llm.model.indexed.margin_dist = 1e30
    ids = llm.tokenize("word1 word2 3 4")
    _, la = _greedy_logits(llm, ids, 8)
    _, lb = _greedy_logits(exact, ids, 8)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)
    assert all(s.head_rows == 4200 for s in llm.model.stats)


def test_sampling_needs_top_k_rows_exactly(indexed):
    """With top-k, every row of the true top k is read exactly (so the sampler's candidates are exact)."""
    out, _, _ = indexed
    llm, exact = _load(out, head="index"), _load(out, head="exact")
    ids = llm.tokenize("word7 8 word9")
    need = need_for(SamplingParams(temperature=0.8, top_k=20, top_p=1.0, min_p=0.0))
    assert need == HeadNeed("sample", 20, 0.0, 0.8)
    llm.model.set_head_need(need)
    a = llm.model.prefill(ids, 0).copy()
    b = exact.model.prefill(ids, 0)
    top = np.argsort(-b)[:20]
    np.testing.assert_allclose(a[top], b[top], rtol=0, atol=1e-4)


def test_exact_needs():
    assert need_for(SamplingParams(repeat_penalty=1.1)) == EXACT
    assert need_for(GREEDY).kind == "greedy"


def _prompt_logits(llm, ids):
    return np.concatenate([rows.copy() for _, rows in llm.model.prefill(ids, 0, logits_rows="all")])


def test_the_head_in_index_order_gives_the_logits_of_token_order(indexed):
    """The converter stores the head (tied to the embedding here) in the index's row order. Every way of
    reading it (resident, streamed, the indexed rows, prompt logits r rows at a time, a token's
    embedding resident or read) gives what the file in token order gives, bit for bit."""
    from gguf_flash.gguf_file import GGUFFile
    out, plain, _ = indexed
    order = _load(out).model.info.head_order
    assert np.array_equal(np.sort(order), np.arange(4200)) and not np.array_equal(order, np.arange(4200))
    stored, source = GGUFFile(out).raw("token_embd.weight"), GGUFFile(plain).raw("token_embd.weight")
    assert np.array_equal(stored, source[order])
    ids = _load(plain).tokenize("word21 5 word8 word60 33 word2")
    ref = _load(plain)
    want = [ref.model.prefill(ids, 0).copy()] + [ref.model.forward(t, len(ids) + i).copy()
                                                  for i, t in enumerate((7, 300, 4100))]
    for kw in ({}, {"head": "index"}):        # head and embedding resident; both read from the file
        llm = _load(out, **kw)
        m = llm.model
        assert m.head_order is not None
        assert (m.plan.head, m.plan.embedding) == (("resident", "with the head") if not kw else
                                                   ("indexed", "on demand (a row per token)"))
        got = [m.prefill(ids, 0).copy()] + [m.forward(t, len(ids) + i).copy() for i, t in enumerate((7, 300, 4100))]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        if kw:   # the indexed head: rows it read are exact, in token order
            m.set_head_need(need_for(GREEDY))
            a = m.forward(11, len(ids)).copy()
            m.set_head_need(EXACT)
            b = ref.model.forward(11, len(ids))
            assert np.argmax(a) == np.argmax(b) and a[np.argmax(b)] == b[np.argmax(b)]
    for kw in ({}, {"head": "index"}):
        a = _prompt_logits(gguf_flash.load(out, n_ctx=128, n_threads=2, mode="flash", logit_rows=4, **kw), ids)
        b = _prompt_logits(gguf_flash.load(plain, n_ctx=128, n_threads=2, mode="flash", logit_rows=4), ids)
        assert a.shape == (len(ids), 4200)
        np.testing.assert_array_equal(a, b)


def test_head_order_that_is_not_a_permutation_is_a_format_error(indexed, tmp_path):
    from gguf import GGUFReader
    out, _, _ = indexed
    t = [t for t in GGUFReader(out).tensors if t.name == "head_index.order"][0]
    data = bytearray(out.read_bytes())
    data[t.data_offset:t.data_offset + 8] = np.array([5, 5], np.int32).tobytes()   # token 5 twice
    bad = tmp_path / "dup.flash.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FlashFormatError, match="dup.flash.gguf.*head_index.order is not a permutation"):
        _load(bad)


def test_file_without_an_index_runs_as_before(indexed):
    _, plain, _ = indexed
    llm = _load(plain)
    assert llm.model.indexed is None
    with pytest.raises(gguf_flash.InvalidArgumentError, match="head index"):
        _load(plain, head="index")
    res = llm.generate(llm.tokenize("word1"), n_predict=4)
    assert len(res.tokens) == 4


def test_bad_index_tensor_is_a_format_error(indexed, tmp_path):
    """A head index whose preview does not match the vocabulary is refused by name."""
    from gguf import GGUFReader
    out, _, _ = indexed
    bad = tmp_path / "bad.flash.gguf"
    data = bytearray(out.read_bytes())
    r = GGUFReader(out)
    field = r.fields["flash.head_index.margin"]
    off = field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
    data[off:off + 4] = np.float32(np.nan).tobytes()
    bad.write_bytes(bytes(data))
    with pytest.raises(FlashFormatError, match="flash.head_index.margin"):
        _load(bad)


def test_an_older_index_is_not_used_and_says_to_convert_again(indexed, tmp_path):
    """A file of the converter before the margin rule (flash.head_index.z, a per-row bound) still runs,
    without its index; asking for the index names the file and what to do."""
    import gguf
    from fuzz_gguf import rewrite
    out, _, _ = indexed
    old = rewrite(out, tmp_path / "old.flash.gguf", meta={"flash.head_index.z": (6.25, gguf.GGUFValueType.FLOAT32, None)},
                  drop=("flash.head_index.margin",))
    llm = _load(old)
    assert llm.model.info.head_index is None and llm.model.info.old_head_index
    assert llm.model.indexed is None
    # the head is still read in the order it is stored in: the same logits as the index-less file's
    _, plain, _ = indexed
    ids = llm.tokenize("word1 word2 3")
    np.testing.assert_array_equal(llm.model.prefill(ids, 0), _load(plain).model.prefill(ids, 0))
    assert len(llm.generate(llm.tokenize("word1"), n_predict=3).tokens) == 3
    with pytest.raises(gguf_flash.InvalidArgumentError, match="old.flash.gguf.*older converter.*convert the source again"):
        _load(old, head="index")


def _plan_input(cap, index_bytes, frac=0.2):
    return PlanInput(cap=cap, baseline=100 * MiB, fixed={"attention": 5 * MiB}, mode="flash", selector="gate",
                     gate_bytes=4 * MiB, pred_bytes=0, head_bytes=100 * MiB, embd_bytes=0,
                     bundle_bytes=[1000] * 2, gate_part=[300] * 2, freq=[np.full(1000, 0.5, np.float32)] * 2,
                     staging_rows=64, index_bytes=index_bytes, index_frac=frac)


def test_plan_chooses_resident_indexed_or_streamed_head():
    assert make_plan(_plan_input(None, 10 * MiB)).head == "resident"
    roomy = make_plan(_plan_input(300 * MiB, 10 * MiB))
    assert roomy.head == "resident" and "head index" not in roomy.resident
    tight_input = _plan_input(140 * MiB, 10 * MiB, frac=0.2)
    tight = make_plan(tight_input)
    assert tight.head == "indexed" and tight.resident["head index"] == 10 * MiB
    # the reading it expects is the index's share of the head, not the whole head's
    whole_ms = 100 / tight_input.large_mib_s * 1e3
    assert 0 < tight.read_ms < 0.5 * whole_ms
    assert make_plan(_plan_input(140 * MiB, 0)).head == "streamed"
    # an index that reads as much as the whole head is not worth its RAM
    assert make_plan(_plan_input(140 * MiB, 10 * MiB, frac=1.0)).head == "streamed"


def test_generation_sets_what_the_head_reads(indexed):
    """generate() tells the model its sampler: greedy reads only what can win (and matches the whole
    head); a repetition penalty reads the whole head; afterwards forward() is exact again."""
    out, _, _ = indexed
    llm, exact = _load(out, head="index"), _load(out, head="exact")
    ids = llm.tokenize("word11 12 word13")
    a = llm.generate(ids, n_predict=12, ignore_eos=True)
    assert a.tokens == exact.generate(ids, n_predict=12, ignore_eos=True).tokens
    assert any(s.head_rows < 4200 for s in llm.model.stats)
    n = len(llm.model.stats)
    llm.generate(ids, n_predict=6, params=SamplingParams(temperature=0.0, repeat_penalty=1.3), ignore_eos=True)
    assert all(s.head_rows == 4200 for s in llm.model.stats[n:])
    llm.model.forward(5, 0)
    assert llm.model.stats[-1].head_rows == 4200


def test_releasing_the_heads_pages_changes_nothing():
    """build_head_index with release (the converter drops the mapped head's pages after each block of
    rows it reads) builds the same index as without, and calls it as it goes."""
    from gguf import GGMLQuantizationType, quants
    rng = np.random.default_rng(1)
    W = rng.standard_normal((3000, 64)).astype(np.float32)
    raw = quants.quantize(W, GGMLQuantizationType.Q8_0)
    train = rng.standard_normal((300, 64)).astype(np.float32)
    held = rng.standard_normal((200, 64)).astype(np.float32)
    calls = []
    a = head_build.build_head_index(raw, GGMLQuantizationType.Q8_0, train, held, 16)
    b = head_build.build_head_index(raw, GGMLQuantizationType.Q8_0, train, held, 16, release=lambda: calls.append(1))
    assert len(calls) > 10
    for k in ("basis", "preview", "scale", "order"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert (a.margin, a.margin_dist, a.read_frac, a.bytes_frac) == (b.margin, b.margin_dist, b.read_frac, b.bytes_frac)


@pytest.mark.parametrize("qt", ["Q8_0", "Q4_1", "Q5_0"])
def test_head_rows_decode_as_gguf_quants_does(qt):
    """The head index's passes decode the head with kernels/dispatch.dequant_rows: the same floats as
    gguf.quants.dequantize, bit for bit, for any block of rows (the last one short)."""
    from gguf import GGMLQuantizationType, quants
    from gguf_flash.flash.head_build import head_rows
    q = GGMLQuantizationType[qt]
    w = np.random.default_rng(4).standard_normal((37, 256)).astype(np.float32)
    raw = quants.quantize(w, q)
    want = quants.dequantize(raw, q).astype(np.float32)
    np.testing.assert_array_equal(head_rows(raw, int(q), 0, 37), want)
    np.testing.assert_array_equal(head_rows(raw, int(q), 30, 40), want[30:])


@pytest.mark.parametrize("name", ["blk.0.attn_output.weight", "blk.0.ffn_down.weight"])
def test_k_quant_head_rows_decode_as_gguf_quants_does(gemma3_path, name):
    """The same for K-quant rows (gguf.quants cannot write them): Gemma 3's own Q4_K and Q6_K tensors."""
    from gguf import GGMLQuantizationType, quants
    from gguf_flash.flash.head_build import head_rows
    from gguf_flash.gguf_file import GGUFFile
    f = GGUFFile(gemma3_path)
    raw, q = np.ascontiguousarray(f.raw(name)[:64]), GGMLQuantizationType(f.tensor(name).qtype)
    want = quants.dequantize(raw, q).astype(np.float32)
    np.testing.assert_allclose(head_rows(raw, int(q), 0, 64), want, rtol=1e-6, atol=1e-7)
