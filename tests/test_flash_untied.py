"""An untied token embedding (Qwen-style) under a cap: never counted whole, read one row per token
through the store, and the logits unchanged."""

import json
import subprocess
import sys

import numpy as np
import pytest

import gguf_flash

RUN = r"""
import sys, json, numpy as np, gguf_flash
path, out, cap = sys.argv[1], sys.argv[2], (None if sys.argv[3] == "none" else sys.argv[3])
llm = gguf_flash.load(path, max_ram=cap, n_ctx=64, selector="gate", n_threads=2)
toks = [5, 17, 99, 200, 3, 42]
np.save(out, np.stack([llm.model.forward(t, p).copy() for p, t in enumerate(toks)]))
print(json.dumps(dict(embedding=llm.model.plan.embedding, head=llm.model.plan.head,
                      resident=list(llm.model.plan.resident), bytes=[s.bytes_read for s in llm.model.stats])))
"""

NEED = r"""
import sys, gguf_flash
try:
    gguf_flash.load(sys.argv[1], max_ram="1M", n_ctx=64, selector="gate")
except gguf_flash.RamCapError as e:
    print(e.need >> 20)
"""


@pytest.fixture(scope="module")
def untied_flash(tmp_path_factory):
    from gguf_flash.synthetic import write_synthetic
    d = tmp_path_factory.mktemp("untied")
    # a big vocabulary next to a small model, as in Qwen-style files: embedding and head (52 MiB each)
    # dominate, and do not fit the room the smallest cap leaves above the runtime
    src = write_synthetic(d / "u.gguf", arch="llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                          n_vocab=200000, qtype="Q8_0", tied=False, seed=7)
    calib = d / "c.txt"
    calib.write_text(" ".join(f"w{i % 50} x{i % 7}" for i in range(3000)))
    out = d / "u.flash.gguf"
    gguf_flash.convert(src, out, calib=calib, calib_tokens=512, sparsity=0.3, rank=8)
    return out


def test_untied_embedding_read_row_by_row_under_a_cap(untied_flash, tmp_path):
    need = subprocess.run([sys.executable, "-c", NEED, str(untied_flash)], capture_output=True, text=True,
                          timeout=600)
    cap = f"{int(need.stdout.strip()) + 8}M"       # 8 MiB over the least cap: no room for a 52 MiB table
    runs = {}
    for capped in (True, False):
        p = subprocess.run([sys.executable, "-c", RUN, str(untied_flash), str(tmp_path / f"u{int(capped)}.npy"),
                            cap if capped else "none"], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[capped] = json.loads(p.stdout.strip().splitlines()[-1])
    tight, roomy = runs[True], runs[False]
    assert tight["embedding"].startswith("on demand") and "token embedding" not in tight["resident"]
    assert roomy["embedding"] == "resident"
    row = 256 // 32 * 34                               # one Q8_0 row of n_embd 256
    for b_tight, b_roomy in zip(tight["bytes"], roomy["bytes"]):
        assert b_tight - b_roomy >= row                # at least its embedding row was read
    np.testing.assert_allclose(np.load(tmp_path / "u1.npy"), np.load(tmp_path / "u0.npy"), rtol=1e-5, atol=1e-4)


def test_untied_head_is_stored_in_index_order_and_the_embedding_is_not(untied_flash):
    """With a head index the converter permutes the head's rows (flash/head.py HeadOrder); an untied
    embedding keeps token order and is looked up without the permutation."""
    from gguf_flash.gguf_file import GGUFFile
    flash, src = GGUFFile(untied_flash), GGUFFile(untied_flash.parent / "u.gguf")
    order = np.asarray(flash.array("head_index.order"))
    assert np.array_equal(np.sort(order), np.arange(200000)) and not np.array_equal(order, np.arange(200000))
    assert np.array_equal(flash.raw("output.weight"), src.raw("output.weight")[order])
    assert np.array_equal(flash.raw("token_embd.weight"), src.raw("token_embd.weight"))
    m = gguf_flash.load(untied_flash, n_ctx=64, n_threads=2).model
    assert m.out_head.order is not None and m.embed.row_of is None
