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

BASE_BYTES = 150 * MiB       # the converter's own RSS with the kernels loaded and LLVM's pages released
                             # (re-measured: 141 MiB on the TinyLlama shape, 144 on SmolLM2)
NEURON_BLOCK = 512           # weight rows the converter dequantizes at a time (bounds the score temporaries)
BATCH = 256                  # predictor training mini-batch
# Per phase, the named arrays' sum against the peak tools/bench_convert.py samples (numpy temporaries not
# named, OpenBLAS's buffers, malloc arenas). TinyLlama's shape, one training thread, MiB over the base,
# named -> sampled: calibrate 215 -> 220, sparsity 76 -> 102, predictors 198 -> 260, write 140 -> 154;
# SmolLM2's head index 224 -> 290 (the earlier 1.3 everywhere came from the 7B shape and TinyLlama).
# Predictors 1.37, not 1.32: the kernel's own high-water mark (VmHWM) read 420 MiB in that phase where the
# 20 ms sampling saw 410 (eigh's copy and workspace live for milliseconds); the floor must cover it.
# Head index 1.38, not 1.3: SmolLM2's phase peaked at 435-454 MiB across runs against a 442 MiB floor.
MARGIN = {"calibrate": 1.1, "sparsity": 1.4, "head index": 1.38, "predictors": 1.37, "write": 1.3}


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
    # held-out passes: the held-out tokens' states and a 32-row block of logits (and log-softmax)
    sparsity = 3 * n_held * E * 4 + 3 * 32 * V * 4 + layer + kv_layer + T * E * 2
    # head index: the head dequantized chunk_rows(E) rows at a time, exact logits of 32 states, the
    # preview (f32, then int8) and its data-weighted basis (predictor.basis_bytes, and scipy from here
    # on, predictor.SCIPY_BYTES), the calibration and greedy states; and the greedy continuations' KV
    # caches (the head's mapped pages stay resident until the phase ends)
    scipy = SCIPY_BYTES if predictors or head_rank else 0
    head = (0 if not head_rank else 3 * chunk_rows(E) * E * 4 + 6 * 32 * V * 4 + V * head_rank * 5
            + basis_bytes(E, head_rank) + 4 * 2048 * E * 4 + head_bytes + T * E * 2 + scipy) + (64 * MiB + layer)
    # predictors: one thread at a time makes the data-weighted basis (its tokens in float16, and
    # predictor.basis_bytes: two n_embd^2 float64 matrices and k eigenvectors; and scipy, imported for it
    # or for the head index and kept to the end); then each
    # thread holds the layer's inputs (f32) and labels, the mask's blocks, and while training the basis,
    # the best predictor so far and the one training, Adam's moments and, at the most, the init's gate
    # estimate on 2048 tokens, or the held-out logits (and their copies). Held throughout: the product
    # criterion's counts, the frequencies and the trained predictors' biases (their factors are parked on
    # disk until written, spill.py). (Without predictors, each thread still makes the labels.)
    k = min(max_rank, E, F)
    label = T * E * 4 + T * F + 3 * 1024 * GateRows.ROWS * 4
    basis = n_train * E * 2 + basis_bytes(E, k)
    training = (label + 4 * k * (E + F) * 4 + 2 * k * (E + F) * 4
                + max(min(n_train, 2048) * F * 5, 6 * BATCH * F * 4, 3 * n_held * F * 4 + n_held * F * 4 // 2))
    per_thread = training if predictors else label
    held = L * F * 12 + L * (n_grid + 1) * F * 4
    train = max(basis if predictors else 0, per_thread) + held + scipy
    # write: a layer's down columns (f32), a dequantized block of them and its transposed copy, the
    # bundle, a block of rows quantizing (gguf.quants' temporaries), the layer's pages
    write = F * E * 4 + 2 * block + layer + 4 * NEURON_BLOCK * E * 4 + layer + held + scipy
    phases = {"calibrate": calibrate, "sparsity": sparsity, "head index": head, "predictors": train, "write": write}
    phases = {k: int(v * MARGIN[k]) for k, v in phases.items()}
    return ConvertRam(phases, BASE_BYTES, layer, int(per_thread * MARGIN["predictors"]))
