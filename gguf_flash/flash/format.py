"""The flash-GGUF variant, version 1 (docs/flash-gguf.md): key and tensor names, and a validating reader.

A flash file is a GGUF with every tensor and key of its source except blk.N.ffn_gate/up/down, which are
replaced per layer by neuron bundles (row i = gate_i | up_i | down_i bytes, hot-first), the original
neuron ids, calibration frequencies and a low-rank predictor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FlashFormatError

FLASH_VERSION = 1
ALIGNMENT = 4096  # general.alignment of flash files: bundle ranges can be read with O_DIRECT

K_VERSION = "flash.version"
K_SOURCE_SHA = "flash.source.sha256"
K_PARTS = "flash.bundle.parts"            # ["gate", "up", "down"]
K_TYPES = "flash.bundle.types"            # u32 (n_layer * 3,): ggml type of gate, up, down per layer
K_BYTES = "flash.bundle.bytes"            # u32 (n_layer * 3,): bytes of each part in a bundle row
K_ACTIVATION = "flash.activation"         # "silu" | "gelu" | "relu"
K_THRESHOLD = "flash.threshold"           # f32 (n_layer,): active means |act(gate . x)| > t_l
K_SPARSITY = "flash.sparsity"             # f32: the target fraction of inactive neurons
K_LAYER_SPARSITY = "flash.sparsity.layer"  # f32 (n_layer,): measured on held-out calibration tokens
K_RANK = "flash.predictor.rank"           # u32 (n_layer,)
K_RECALL = "flash.predictor.recall"       # f32 (n_layer,) held-out
K_PRECISION = "flash.predictor.precision"  # f32 (n_layer,) held-out
K_PRED_KIND = "flash.predictor.kind"      # u32 (n_layer,): 0 logit = z, 1 logit = |z| - offset
K_PRED_OFFSET = "flash.predictor.offset"  # f32 (n_layer,)   (z = x A B + bias; active iff logit > 0)
K_CAL_TOKENS = "flash.calibration.tokens"  # u32: calibration tokens (train + held-out)
K_CAL_SOURCE = "flash.calibration.source"  # str
K_CURVE_S = "flash.curve.sparsity"        # f32: sparsity grid evaluated at conversion
K_CURVE_PPL = "flash.curve.perplexity"    # f32: held-out perplexity at each grid point (0: dense)

PARTS = ("gate", "up", "down")


def t_bundle(il): return f"blk.{il}.ffn_bundle"
def t_neuron_id(il): return f"blk.{il}.ffn_neuron_id"
def t_freq(il): return f"blk.{il}.ffn_freq"
def t_pred_a(il): return f"blk.{il}.ffn_pred_a"
def t_pred_b(il): return f"blk.{il}.ffn_pred_b"
def t_pred_bias(il): return f"blk.{il}.ffn_pred_bias"


def part_bytes(qtype: int, n: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return n // block * size


@dataclass
class FlashLayer:
    bundle_offset: int       # absolute file offset of row 0 (4096-aligned)
    bundle_bytes: int        # bytes per row = sum(part_bytes)
    types: tuple             # (gate, up, down) ggml types
    part_bytes: tuple        # (gate, up, down) bytes
    neuron_id: np.ndarray    # (n_ff,) int32: original neuron of each stored row
    freq: np.ndarray         # (n_ff,) f32: calibration activation frequency (descending)
    threshold: float
    pred_a: np.ndarray       # (n_embd, r) f16 view into the file map
    pred_b: np.ndarray       # (r, n_ff) f16 view
    pred_bias: np.ndarray    # (n_ff,) f32
    recall: float
    precision: float
    pred_abs: bool           # logit = |z| - offset (gated SiLU/GELU) instead of z (ReLU)
    pred_offset: float


@dataclass
class FlashInfo:
    version: int
    activation: str
    sparsity: float
    layers: list
    source_sha256: str
    calibration_tokens: int
    calibration_source: str

    @property
    def bundle_bytes_total(self) -> int:
        return sum(l.bundle_bytes * len(l.neuron_id) for l in self.layers)


def is_flash(f) -> bool:
    return K_VERSION in f.meta


def read_flash(f, cfg) -> FlashInfo:
    """Validate the flash keys and tensors of an open GGUFFile against its ModelConfig."""
    def need(key):
        if key not in f.meta:
            raise FlashFormatError(f"{f.path}: flash file without key {key}")
        return f.meta[key]

    version = int(need(K_VERSION))
    if version != FLASH_VERSION:
        raise FlashFormatError(f"{f.path}: flash format version {version}, this engine reads {FLASH_VERSION}")
    L = cfg.n_layer
    types = np.asarray(need(K_TYPES), np.int64).reshape(-1)
    nbytes = np.asarray(need(K_BYTES), np.int64).reshape(-1)
    thresholds = np.asarray(need(K_THRESHOLD), np.float32)
    recall = np.asarray(need(K_RECALL), np.float32)
    precision = np.asarray(need(K_PRECISION), np.float32)
    kinds = np.asarray(need(K_PRED_KIND), np.int64)
    offsets = np.asarray(need(K_PRED_OFFSET), np.float32)
    if types.size != 3 * L or nbytes.size != 3 * L or thresholds.size != L or recall.size != L \
            or kinds.size != L or offsets.size != L:
        raise FlashFormatError(f"{f.path}: flash per-layer keys do not have {L} layers")
    layers = []
    for il in range(L):
        t = tuple(int(x) for x in types[3 * il:3 * il + 3])
        pb = tuple(int(x) for x in nbytes[3 * il:3 * il + 3])
        want = (part_bytes(t[0], cfg.n_embd), part_bytes(t[1], cfg.n_embd), part_bytes(t[2], cfg.n_embd))
        if pb != want:
            raise FlashFormatError(f"{f.path}: layer {il} bundle parts {pb} bytes, types imply {want}")
        info = f.tensor(t_bundle(il))
        if info.n_bytes != cfg.n_ff * sum(pb) or info.offset % ALIGNMENT:
            raise FlashFormatError(f"{f.path}: {t_bundle(il)} has {info.n_bytes} bytes at offset "
                                   f"{info.offset}, expected {cfg.n_ff} rows of {sum(pb)} at a 4096 boundary")
        nid = np.asarray(f.array(t_neuron_id(il)), np.int32)
        if nid.shape != (cfg.n_ff,) or not np.array_equal(np.sort(nid), np.arange(cfg.n_ff)):
            raise FlashFormatError(f"{f.path}: {t_neuron_id(il)} is not a permutation of {cfg.n_ff} neurons")
        # predictor factors stay float16 views into the map (not resident) until a runtime uses them
        a, b = f.array(t_pred_a(il)), f.array(t_pred_b(il))
        bias = np.asarray(f.array(t_pred_bias(il)), np.float32)
        if a.ndim != 2 or a.shape[0] != cfg.n_embd or b.shape != (a.shape[1], cfg.n_ff) or bias.shape != (cfg.n_ff,):
            raise FlashFormatError(f"{f.path}: layer {il} predictor shapes {a.shape} {b.shape} {bias.shape}")
        layers.append(FlashLayer(info.offset, sum(pb), t, pb, nid, np.asarray(f.array(t_freq(il)), np.float32),
                                 float(thresholds[il]), a, b, bias, float(recall[il]), float(precision[il]),
                                 bool(kinds[il]), float(offsets[il])))
    return FlashInfo(version, str(need(K_ACTIVATION)), float(need(K_SPARSITY)), layers,
                     str(f.get(K_SOURCE_SHA, "")), int(f.get(K_CAL_TOKENS, 0)), str(f.get(K_CAL_SOURCE, "")))
