"""Prompt processing in chunks (flash/prefill.py): bitwise the logits of feeding the prompt one token
at a time, each bundle read at most once per chunk, and the window warm afterwards."""

import subprocess
import sys

import numpy as np
import pytest

import gguf_flash

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. " * 2)


def _token_by_token(model, ids):
    for i, t in enumerate(ids):
        logits = model.forward(t, i)
    return logits.copy()


@pytest.mark.parametrize("mode,selector", [("flash", "gate"), ("flash", "predictor"), ("naive", "auto")])
def test_chunked_prefill_equals_token_by_token(smollm2_flash, mode, selector):
    path, _ = smollm2_flash
    a = gguf_flash.load(path, n_ctx=256, mode=mode, selector=selector)
    b = gguf_flash.load(path, n_ctx=256, mode=mode, selector=selector)
    ids = a.tokenize(PROMPT)
    assert len(ids) > 64                      # more than one chunk
    chunked = a.model.prefill(ids, 0).copy()
    np.testing.assert_array_equal(chunked, _token_by_token(b.model, ids))
    assert len(a.model.prompt_stats) == -(-len(ids) // 64) and not a.model.stats
    # decoding goes on from the same KV cache: the next token's logits agree too
    np.testing.assert_array_equal(a.model.forward(17, len(ids)), b.model.forward(17, len(ids)))


CHUNK_UNDER_CAP = r"""
import sys, numpy as np, gguf_flash
path, out, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    gguf_flash.load(path, max_ram="1M", n_ctx=256, selector="gate")
except gguf_flash.RamCapError as e:
    cap = e.need + (2 << 20)   # a second load in this process measures its runtime a little higher
llm = gguf_flash.load(path, max_ram=cap, n_ctx=256, selector="gate", n_threads=2)
ids = llm.tokenize(prompt)
np.save(out, llm.model.prefill(ids, 0))
print(sum(c.overflow for c in llm.model.prompt_stats))
"""


def test_chunked_prefill_at_the_smallest_cap_equals_token_by_token(smollm2_flash, tmp_path):
    """Chunks whose union does not fit the window: it streams through the staging buffer in parts, and
    the logits are still those of an uncapped token-by-token run."""
    path, _ = smollm2_flash
    out = subprocess.run([sys.executable, "-c", CHUNK_UNDER_CAP, str(path), str(tmp_path / "c.npy"), PROMPT],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 0      # chosen neurons streamed through the staging buffer
    ref = gguf_flash.load(path, n_ctx=256, selector="gate")
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), _token_by_token(ref.model, ref.tokenize(PROMPT)))


@pytest.mark.parametrize("mode", ["flash", "naive"])
def test_a_256_token_prompt_reads_each_bundle_at_most_once(tmp_path, mode):
    """Synthetic ReLU model (power-law hot neurons), one 256-token chunk: the bytes read for the prompt
    are at most every bundle once (plus one embedding row per token), where token by token reads the
    chosen bundles of every token."""
    from gguf_flash.flash.runtime import FlashModel
    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / "s.gguf", arch="llama", n_layer=2, n_embd=128, n_ff=512, n_head=4,
                          n_head_kv=2, n_vocab=300, qtype="Q8_0", seed=3, activation="relu", hot_alpha=0.5)
    calib = tmp_path / "c.txt"
    calib.write_text(" ".join(f"w{i % 50} x{i % 7}" for i in range(3000)))
    flash = tmp_path / "s.flash.gguf"
    gguf_flash.convert(src, flash, calib=calib, calib_tokens=512, rank=8)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 300, 256)]
    a = FlashModel(GGUFFile(flash), mode=mode, n_ctx=300, prefill_chunk=256)
    chunked = a.prefill(ids, 0).copy()
    all_bundles = sum(l.bundle_bytes * 512 for l in a.info.layers)
    assert len(a.prompt_stats) == 1
    chunk_bytes = a.prompt_stats[0].bytes_read
    assert chunk_bytes <= all_bundles
    b = FlashModel(GGUFFile(flash), mode=mode, n_ctx=300)
    np.testing.assert_array_equal(chunked, _token_by_token(b, ids))
    per_token = sum(s.bytes_read for s in b.stats)
    assert per_token > chunk_bytes, (per_token, chunk_bytes)
