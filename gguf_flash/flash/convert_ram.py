"""The converter's RAM: what each phase holds, from the model's shape alone, so that `convert --max-ram`
refuses an impossible cap before reading the model, and picks the training threads that fit.

The converter runs the model layer-major (layerwise.py), so no phase holds more than about one layer of
weights; what grows is per-token state (calibration tokens x n_embd), per-layer scores (training tokens
x n_ff) and, while predictors train, per-thread work. Each term below names the array it stands for
(convert.py, calibrate.py, quantile.py, predictor.py, head_build.py); BASE_BYTES is the process itself (Python,
numpy, numba and the loaded kernels), measured. tools/bench_convert.py checks the estimate against the
peak sampled from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

from .head_build import chunk_rows
from .plan import MiB
from .predictor import SCIPY_BYTES, GateRows, basis_bytes
from .quantile import temp_bytes

BASE_BYTES = 134 * MiB       # the converter's own RSS with the kernels loaded and LLVM's pages released,
TOKEN_BYTES = 256            # and per vocabulary entry (the parsed token list, the tokenizer): 141 MiB on
                             # the TinyLlama shape (32,000 tokens), 144 on SmolLM2 (49,152); without the
                             # kernels, Gemma 3's (262,144) 60 MiB above TinyLlama's
NEURON_BLOCK = 512           # weight rows the converter dequantizes at a time (bounds the score temporaries)
BATCH = 256                  # predictor training mini-batch
WRITE_BLOCK_BYTES = 16 * MiB  # a tensor copied as it is is written this many bytes at a time, and its pages
                              # released (convert_write._RowBlocks)
# Per phase: the named arrays' sum x MARGIN + EXTRA, fitted so that each phase's estimate covers the peak
# tools/bench_convert.py samples in it (session 15: SmolLM2, Gemma 3 and the TinyLlama shape, one training
# thread). EXTRA is what no term names and does not grow with the model (numpy temporaries, OpenBLAS's
# buffers, malloc arenas, the spill file's pages): most of a small model's phases. MiB over the base,
# estimate -> sampled, SmolLM2 / Gemma 3 / TinyLlama: calibrate 117 -> 114 / 131 -> 101 / 271 -> 228;
# sparsity 70 -> 69 / 245 -> 241 / 111 -> 101; head index 135 -> 94 / 284 -> 227 / 236 -> 194 (before
# head_build._round1); predictors 99 -> 88 / 101 -> 97 / 253 -> 233 (the kernel's VmHWM: 244); write
# 115 -> 72 / 143 -> 113 / 209 -> 192. The head index's build terms are summed though they do not all
# live at once (the basis, the exact logits' batches and the k-means run one after another): 0.7-0.8 of
# the sum was sampled, so it counts at 0.85.
MARGIN = {"calibrate": 1.1, "sparsity": 1.1, "head index": 0.85, "predictors": 1.1, "write": 1.1}
EXTRA = {"calibrate": 35 * MiB, "sparsity": 15 * MiB, "head index": 0, "predictors": 45 * MiB, "write": 25 * MiB}


@dataclass
class ConvertRam:
    phases: dict             # phase -> bytes it adds to the base
    base: int
    layer: int               # the largest layer's weight bytes (the pages a layer pass holds)
    per_thread: int          # predictor training, per thread

    @property
    def floor(self) -> int:
        """The least cap the converter can keep: one training thread."""
        return self.base + max(self.phases.values())

    def threads(self, cap: int | None, n_cpu: int) -> int:
        """Training threads within cap (None: no cap): each one beyond the first adds per_thread."""
        n = max(1, min(n_cpu, 4))
        if cap is None:
            return n
        return max(1, min(n, 1 + int((cap - self.floor) // max(self.per_thread, 1))))


def convert_ram(f, cfg, n_tokens: int, chunk: int, held_out: float, predictors: bool, head_rank: int,
                head_bytes: int, max_rank: int = 256, n_grid: int = 18) -> ConvertRam:
    """The estimate for a conversion of `f` (a GGUFFile; only its tensor table is read) calibrating on
    n_tokens in chunks of `chunk`, predictors of rank up to max_rank, n_grid sparsities."""
    E, F, V, L = cfg.n_embd, cfg.n_ff, cfg.n_vocab, cfg.n_layer
    n_chunks = max(n_tokens // chunk, 2)
    T = n_chunks * chunk
    n_held = max(1, int(round(n_chunks * held_out))) * chunk
    n_train = T - n_held
    layer = 0
    for il in range(L):
        layer = max(layer, sum(t.n_bytes for name, t in f.tensors.items() if name.startswith(f"blk.{il}.")))
    kv_layer = 2 * chunk * cfg.kv_dim * 2
    block = NEURON_BLOCK * max(E, F) * 4
    # calibration: the residual X and the FFN inputs captured for all tokens; per layer the training
    # tokens' scores, and beside them the quantiles' temporaries (quantile.py) or the score blocks' (a
    # block of the tokens' dot products with dequantized rows, and its activation); after the last layer
    # the final states instead (f32, then f16)
    scores = n_train * F * 4 + max(temp_bytes(n_train * F, n_grid), 3 * T * NEURON_BLOCK * 4) + 2 * block
    calibrate = 2 * T * E * 4 + max(scores, T * E * 4 + T * E * 2) + layer + kv_layer
    # held-out passes: the held-out tokens' states and a 32-row block of logits (and log-softmax, and
    # their temporaries)
    sparsity = 3 * n_held * E * 4 + 6 * 32 * V * 4 + layer + kv_layer + T * E * 2
    # head index: the head dequantized chunk_rows(E) rows at a time (and those rows' mapped pages: the
    # rest are released as it goes, head_build._Head), exact logits of 32 states, the preview (f32, then
    # int8) and its data-weighted basis (predictor.basis_bytes, and scipy from here on,
    # predictor.SCIPY_BYTES), the calibration and greedy states; and the greedy continuations' KV caches.
    # The continuations run first, then the index is built from their states: the phase holds the states
    # and the larger of the two
    scipy = SCIPY_BYTES if predictors or head_rank else 0
    head_block = chunk_rows(E) * (head_bytes // max(V, 1))
    states = 4 * 2048 * E * 4 + T * E * 2
    build = (3 * chunk_rows(E) * E * 4 + 4 * 32 * V * 4 + V * head_rank * 5 + basis_bytes(E, head_rank)
             + head_block + scipy)
    head = states + max(64 * MiB + layer, build if head_rank else 0)
    # predictors: one thread at a time makes the data-weighted basis (its tokens in float16, and
    # predictor.basis_bytes: two n_embd^2 float64 matrices and k eigenvectors; and scipy, imported for it
    # or for the head index and kept to the end); then each
    # thread holds the layer's inputs (f32) and labels, the mask's blocks, and while training the basis,
    # the best predictor so far and the one training, Adam's moments and, at the most, a mini-batch's
    # temporaries or the held-out logits (and their copies). Held throughout: the product
    # criterion's counts, the frequencies and the trained predictors' biases (their factors are parked on
    # disk until written, spill.py). (Without predictors, each thread still makes the labels.)
    k = min(max_rank, E, F)
    label = T * E * 4 + T * F + 3 * 1024 * GateRows.ROWS * 4
    basis = n_train * E * 2 + basis_bytes(E, k)
    training = (label + 4 * k * (E + F) * 4 + 2 * k * (E + F) * 4
                + max(6 * BATCH * F * 4, 2 * n_held * F * 4 + n_held * F))
    per_thread = training if predictors else label
    held = L * F * 12 + L * (n_grid + 1) * F * 4
    train = max(basis if predictors else 0, per_thread) + held + scipy
    # write: a layer's down columns (f32), a dequantized block of them and its transposed copy, the
    # bundle, a block of rows quantizing (gguf.quants' temporaries), the layer's pages; or a block of a
    # tensor written as it is (a block, and the pages its rows touched: a permuted head's block of 256
    # rows mapped ~42 MiB of Gemma 3's head, convert_write._RowBlocks); and the writer's copy of the
    # metadata, the vocabulary's above all (+28 MiB on Gemma 3's 262,144 tokens)
    other = 3 * WRITE_BLOCK_BYTES
    write = (max(F * E * 4 + 2 * block + layer + 4 * NEURON_BLOCK * E * 4 + layer, other) + held + scipy
             + V * TOKEN_BYTES // 2)
    phases = {"calibrate": calibrate, "sparsity": sparsity, "head index": head, "predictors": train, "write": write}
    phases = {k: int(v * MARGIN[k] + EXTRA[k]) for k, v in phases.items()}
    return ConvertRam(phases, BASE_BYTES + V * TOKEN_BYTES, layer, int(per_thread * MARGIN["predictors"]))
