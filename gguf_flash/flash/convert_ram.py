"""The converter's RAM: what each phase holds, from the model's shape alone, so that `convert --max-ram`
refuses an impossible cap before reading the model, and picks the training threads that fit.

The converter runs the model layer-major (layerwise.py), so no phase holds more than about one layer of
weights; what grows is per-token state (calibration tokens x n_embd), per-layer scores (training tokens
x n_ff) and, while predictors train, per-thread work. Each term below names the array it stands for
(convert.py, calibrate.py, predictor.py, head_build.py); BASE_BYTES is the process itself (Python,
numpy, numba and the loaded kernels), measured. tools/bench_convert.py checks the estimate against the
peak sampled from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

from .head_build import ROW_CHUNK
from .plan import MiB

BASE_BYTES = 150 * MiB       # the converter's own RSS with the kernels loaded (SmolLM2, TinyLlama shape)
NEURON_BLOCK = 512           # weight rows the converter dequantizes at a time (bounds the score temporaries)
BATCH = 256                  # predictor training mini-batch
MARGIN = 1.3                 # the named arrays' sum against the peak sampled by tools/bench_convert.py
                             # (numpy temporaries not named, malloc arenas): 7B shape, TinyLlama shape


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
                head_bytes: int) -> ConvertRam:
    """The estimate for a conversion of `f` (a GGUFFile; only its tensor table is read) calibrating on
    n_tokens in chunks of `chunk`."""
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
    # calibration: residual X, FFN inputs captured, final states (f32 then f16) for all tokens; per layer
    # the training tokens' scores, np.quantile's copy of them, the held-out scores, a dequantized block
    calibrate = (3 * T * E * 4 + T * E * 2 + 2 * n_train * F * 4 + n_held * F * 4 + 3 * n_train * NEURON_BLOCK * 4
                 + 2 * block + layer + kv_layer)
    # held-out passes: the held-out tokens' states and a 32-row block of logits (and log-softmax)
    sparsity = 3 * n_held * E * 4 + 3 * 32 * V * 4 + layer + kv_layer + T * E * 2
    # head index: the head dequantized ROW_CHUNK rows at a time, exact logits of 32 states, the preview
    # and whitening, the calibration and greedy states; and the greedy continuations' KV caches
    # (the head's mapped pages stay resident until the phase ends)
    head = (0 if not head_rank else 3 * ROW_CHUNK * E * 4 + 6 * 32 * V * 4 + V * head_rank * 5 + 6 * E * E * 4
            + 4 * 2048 * E * 4 + head_bytes + T * E * 2) + (64 * MiB + layer)
    # predictors, per thread: the gate dequantized, the layer's inputs (f32) and labels, the basis
    # (5 n_embd^2 float64, one thread at a time), mini-batch temporaries, Adam's moments, held-out logits
    # (without predictors, each thread still dequantizes the gate for the frequencies and labels)
    label = F * E * 4 + T * E * 4 + T * F + 3 * BATCH * F * 4
    per_thread = (label + 6 * BATCH * F * 4 + 3 * 4 * 256 * (E + F) + 3 * n_held * F * 4 + 2048 * F * 4
                  if predictors else label)
    train = per_thread + (5 * E * E * 8 if predictors else 0) + L * F * 8
    # write: a layer's down columns (f32), a dequantized block of them, the bundle and its quantized part
    write = F * E * 4 + block + 2 * F * (layer // max(F, 1)) + layer
    phases = {"calibrate": calibrate, "sparsity": sparsity, "head index": head, "predictors": train, "write": write}
    phases = {k: int(v * MARGIN) for k, v in phases.items()}
    return ConvertRam(phases, BASE_BYTES, layer, int(per_thread * MARGIN))
