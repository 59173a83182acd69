"""The flash-GGUF variant, version 1 (docs/flash-gguf.md): key and tensor names, and a validating reader.

A flash file is a GGUF with every tensor and key of its source except blk.N.ffn_gate/up/down, which are
replaced per layer by neuron bundles (row i = gate_i | up_i | down_i bytes, hot-first), the original
neuron ids, calibration frequencies and, where the converter stored one, a low-rank predictor
(flash.predictor.rank 0: that layer has none, and no predictor tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FlashFormatError
from ..kernels.quant_cols import COLS_BLOCK, COLS_NAMES, COLS_TYPES, cols_bytes, cols_has_min

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
K_RANK = "flash.predictor.rank"           # u32 (n_layer,): 0 = no predictor (and no pred tensors)
K_RECALL = "flash.predictor.recall"       # f32 (n_layer,) held-out
K_PRECISION = "flash.predictor.precision"  # f32 (n_layer,) held-out
K_PRED_KIND = "flash.predictor.kind"      # u32 (n_layer,): 0 logit = z, 1 logit = |z| - offset
K_PRED_OFFSET = "flash.predictor.offset"  # f32 (n_layer,)   (z = x A B + bias; active iff logit > 0)
K_CAL_TOKENS = "flash.calibration.tokens"  # u32: calibration tokens (train + held-out)
K_CAL_SOURCE = "flash.calibration.source"  # str
K_CURVE_S = "flash.curve.sparsity"        # f32: sparsity grid evaluated at conversion
K_CURVE_PPL = "flash.curve.perplexity"    # f32: held-out perplexity at each grid point (0: dense)

# the product selector's criterion (optional: gated activations only; a file without it has no product
# selector): active means |act(gate . x) * (up . x)| * ||down_i|| > t_l
K_PROD_THRESHOLD = "flash.product.threshold"       # f32 (n_layer,)
K_PROD_SPARSITY = "flash.product.sparsity"         # f32: its target fraction of inactive neurons
K_PROD_LAYER_SPARSITY = "flash.product.sparsity.layer"  # f32 (n_layer,): measured on held-out tokens
K_PROD_CURVE_S = "flash.product.curve.sparsity"    # f32: the grid points evaluated (0: dense)
K_PROD_CURVE_PPL = "flash.product.curve.perplexity"  # f32: held-out perplexity at each

# the gate criterion's per-token top-k rule (optional; the converter stores it where it keeps a larger
# sparsity within the budget than the threshold t_l): the gate-rows selector chooses, for each token,
# its own keep_l largest |act(gate . x)| instead of those above t_l. The other selectors keep t_l
# (they decide before, or without, every row's gate value).
K_GATE_KEEP = "flash.gate.keep"                    # u32 (n_layer,): rows each token keeps (0: the threshold)
K_GATE_KEEP_SPARSITY = "flash.gate.keep.sparsity"  # f32: 1 - keep / n_ff, the rule's target sparsity
K_KEEP_CURVE_S = "flash.gate.keep.curve.sparsity"  # f32: the grid points evaluated (0: dense)
K_KEEP_CURVE_PPL = "flash.gate.keep.curve.perplexity"  # f32: held-out perplexity at each
# the same rule on the product criterion, for the product selector (it has every row's h before choosing):
# each token keeps its own keep'_l largest |act(gate . x) (up . x)| ||down_i|| instead of those above t'_l
K_PROD_KEEP = "flash.product.keep"                   # u32 (n_layer,)
K_PROD_KEEP_SPARSITY = "flash.product.keep.sparsity"  # f32
K_PROD_KEEP_CURVE_S = "flash.product.keep.curve.sparsity"      # f32
K_PROD_KEEP_CURVE_PPL = "flash.product.keep.curve.perplexity"  # f32

# the output head's index (flash/head_build.py; optional: a file without it streams or holds the head)
K_HI_MARGIN = "flash.head_index.margin"        # f32: rows above bar - margin x (best - mean preview) are read
K_HI_MARGIN_DIST = "flash.head_index.margin_dist"  # f32: the same for samplers (rows near the top read too)
K_HI_Z = "flash.head_index.z"                  # f32: an older index's bound (per-row sigma): not read any more
K_HI_HELDOUT = "flash.head_index.heldout"      # u32: held-out states the margin was calibrated on
K_HI_READ = "flash.head_index.read_fraction"   # f32: mean share of head rows read on them at the margin
K_HI_BYTES = "flash.head_index.bytes_fraction"  # f32: mean share of head bytes read (gaps < 16 KiB read through)
T_HI_BASIS = "head_index.basis"                # f32 (r, n_embd): y = basis @ h
T_HI_PREVIEW = "head_index.preview"            # i8 (n_vocab, r)
T_HI_SCALE = "head_index.scale"                # f16 (n_vocab,): preview row scale
T_HI_ORDER = "head_index.order"                # i32 (n_vocab,): stored head row j is token order[j] (the
                                               # head, a tied embedding, preview and scale are in this order);
                                               # absent: token order (files of the converter before it)
HI_TENSORS = {"basis": T_HI_BASIS, "preview": T_HI_PREVIEW, "scale": T_HI_SCALE}

PARTS = ("gate", "up", "down")


def t_bundle(il): return f"blk.{il}.ffn_bundle"
def t_neuron_id(il): return f"blk.{il}.ffn_neuron_id"
def t_freq(il): return f"blk.{il}.ffn_freq"
def t_pred_a(il): return f"blk.{il}.ffn_pred_a"
def t_pred_b(il): return f"blk.{il}.ffn_pred_b"
def t_pred_bias(il): return f"blk.{il}.ffn_pred_bias"
def t_down_norm(il): return f"blk.{il}.ffn_down_norm"      # f32 (n_ff,) ||down_i||, stored row order
def t_prod_freq(il): return f"blk.{il}.ffn_prod_freq"      # f32 (n_ff,) product-criterion frequency
def t_down_scale(il): return f"blk.{il}.ffn_down_scale"    # f16 (n_ff / 32, n_embd) column-down scales
def t_down_min(il): return f"blk.{il}.ffn_down_min"        # f16 (n_ff / 32, n_embd) column-down offsets (COLS_U4)


def part_bytes(qtype: int, n: int) -> int:
    """Bytes of a part of n values: a ggml type, or a column kind of the down part (quant_cols.py)."""
    if qtype in COLS_TYPES:
        return cols_bytes(qtype, n)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return n // block * size


def part_type_name(qtype: int) -> str:
    return COLS_NAMES[qtype] if qtype in COLS_TYPES else GGMLQuantizationType(qtype).name


@dataclass
class FlashLayer:
    bundle_offset: int       # absolute file offset of row 0 (4096-aligned)
    bundle_bytes: int        # bytes per row = sum(part_bytes)
    types: tuple             # (gate, up, down) ggml types
    part_bytes: tuple        # (gate, up, down) bytes
    neuron_id: np.ndarray    # (n_ff,) int32: original neuron of each stored row
    freq: np.ndarray         # (n_ff,) f32: calibration activation frequency (descending)
    threshold: float
    pred_a: np.ndarray | None     # (n_embd, r) f16 view into the file map; None: no predictor
    pred_b: np.ndarray | None     # (r, n_ff) f16 view
    pred_bias: np.ndarray | None  # (n_ff,) f32
    recall: float
    precision: float
    pred_abs: bool           # logit = |z| - offset (gated SiLU/GELU) instead of z (ReLU)
    pred_offset: float
    prod_threshold: float = 0.0             # the product criterion's t_l (with down_norm)
    down_norm: np.ndarray | None = None     # (n_ff,) f32 view: ||down_i|| of each stored row; None: no product
    prod_freq: np.ndarray | None = None     # (n_ff,) f32 view: how often each stored row is chosen by it
    keep: int = 0                           # the gate-rows selector's per-token top-k (0: the threshold)
    prod_keep: int = 0                      # the product selector's per-token top-k (0: its threshold)
    down_scale: np.ndarray | None = None    # (n_ff / 32, n_embd) f16 view: column down parts' scales (None:
                                            # the down part is a ggml type)
    down_min: np.ndarray | None = None      # (n_ff / 32, n_embd) f16 view: their offsets (COLS_U4 only)

    @property
    def table_bytes(self) -> int:
        """Bytes of the column-down tables, which the runtime holds in RAM (0 without)."""
        return sum(0 if v is None else v.nbytes for v in (self.down_scale, self.down_min))

    @property
    def rank(self) -> int:
        return 0 if self.pred_a is None else self.pred_a.shape[1]

    @property
    def pred_bytes(self) -> int:
        """Bytes of the predictor as stored (A, B F16; bias F32), 0 without one."""
        return 0 if self.pred_a is None else 2 * (self.pred_a.size + self.pred_b.size) + 4 * self.pred_bias.size


@dataclass
class FlashInfo:
    version: int
    activation: str
    sparsity: float
    layers: list
    source_sha256: str
    calibration_tokens: int
    calibration_source: str
    head_index: dict | None = None   # arrays (views into the map) + margin, heldout, read_frac; None: no index
    prod_sparsity: float = 0.0       # the product selector's target sparsity (0 without one)
    old_head_index: bool = False     # the file has an index of an older converter (K_HI_Z), which is not used
    head_order: np.ndarray | None = None  # (n_vocab,) int32: stored head row j is token head_order[j]
                                          # (T_HI_ORDER); None: the head is in token order
    keep_sparsity: float = 0.0       # the gate-rows selector's top-k rule's target sparsity (0: none)
    prod_keep_sparsity: float = 0.0  # the product selector's top-k rule's (0: none)

    @property
    def bundle_bytes_total(self) -> int:
        return sum(l.bundle_bytes * len(l.neuron_id) for l in self.layers)

    @property
    def has_predictors(self) -> bool:
        """Every layer has a predictor (the runtime's "predictor" selector needs one per layer)."""
        return all(l.pred_a is not None for l in self.layers)

    @property
    def has_product(self) -> bool:
        """The file stores the product criterion (the runtime's "product" selector)."""
        return all(l.down_norm is not None for l in self.layers)


def is_flash(f) -> bool:
    return K_VERSION in f.meta


# ggml type ids of the per-layer tensors (docs/flash-gguf.md)
F32, F16, I8, I32 = 0, 1, 24, 26
ACTIVATION_NAMES = ("silu", "gelu", "relu")


def read_flash(f, cfg) -> FlashInfo:
    """Validate the flash keys and tensors of an open GGUFFile against its ModelConfig: every value a
    runtime sizes a buffer from or indexes with is checked here (a hostile file must fail here, with a
    FlashFormatError naming the file, not as a wrong read later)."""
    def need(key):
        if key not in f.meta:
            raise FlashFormatError(f"{f.path}: flash file without key {key}")
        return f.meta[key]

    def numbers(key, n, dtype=np.float32, lo=-np.inf, hi=np.inf):
        """A numeric per-layer array key with n finite entries in [lo, hi]."""
        v = need(key)
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "iuf" or v.size != n:
            raise FlashFormatError(f"{f.path}: {key} must be {n} numbers (one per layer{' part' if n != L else ''})")
        v = v.astype(np.float64)
        if not (np.isfinite(v).all() and (v >= lo).all() and (v <= hi).all()):
            raise FlashFormatError(f"{f.path}: {key} has a value that is not finite or outside [{lo}, {hi}]")
        return v.astype(dtype)

    def scalar(key, kind, lo=-np.inf, hi=np.inf):
        v = need(key)
        if kind is str:
            if not isinstance(v, str):
                raise FlashFormatError(f"{f.path}: {key} must be a string")
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (np.isfinite(v) and lo <= v <= hi):
            raise FlashFormatError(f"{f.path}: {key} = {v!r} is not a number in [{lo}, {hi}]")
        return kind(v)

    def tensor(name, ne, types, what):
        info = f.tensor(name)
        if info.qtype not in types:
            raise FlashFormatError(f"{f.path}: {name} is {info.type_name}, the format stores {what}")
        if ne is not None and tuple(info.ne) != ne:
            raise FlashFormatError(f"{f.path}: {name} has shape {list(info.ne)}, expected {list(ne)}")
        return info

    from ..kernels.dispatch import SUPPORTED     # the bundle parts' types must have kernels
    version = scalar(K_VERSION, int, 0, 1 << 31)
    if version != FLASH_VERSION:
        raise FlashFormatError(f"{f.path}: flash format version {version}, this engine reads {FLASH_VERSION}")
    L, n_ff, n_embd = cfg.n_layer, cfg.n_ff, cfg.n_embd
    types = numbers(K_TYPES, 3 * L, np.int64, 0, 1 << 31)
    nbytes = numbers(K_BYTES, 3 * L, np.int64, 1, 1 << 31)
    thresholds = numbers(K_THRESHOLD, L, lo=0.0)
    recall = numbers(K_RECALL, L, lo=0.0, hi=1.0)
    precision = numbers(K_PRECISION, L, lo=0.0, hi=1.0)
    kinds = numbers(K_PRED_KIND, L, np.int64, 0, 1)
    ranks = numbers(K_RANK, L, np.int64, 0, n_embd)
    offsets = numbers(K_PRED_OFFSET, L)
    activation = scalar(K_ACTIVATION, str)
    if activation not in ACTIVATION_NAMES:
        raise FlashFormatError(f"{f.path}: {K_ACTIVATION} {activation!r} is not one of {', '.join(ACTIVATION_NAMES)}")
    sparsity = scalar(K_SPARSITY, float, 0.0, 1.0)
    if K_LAYER_SPARSITY in f.meta:
        numbers(K_LAYER_SPARSITY, L, lo=0.0, hi=1.0)
    product = K_PROD_THRESHOLD in f.meta
    prod_thr = numbers(K_PROD_THRESHOLD, L, lo=0.0) if product else np.zeros(L, np.float32)
    prod_sparsity = scalar(K_PROD_SPARSITY, float, 0.0, 1.0) if product else 0.0
    topk = K_GATE_KEEP in f.meta
    keep = numbers(K_GATE_KEEP, L, np.int64, 1, n_ff) if topk else np.zeros(L, np.int64)
    keep_sparsity = scalar(K_GATE_KEEP_SPARSITY, float, 0.0, 1.0) if topk else 0.0
    ptopk = product and K_PROD_KEEP in f.meta
    prod_keep = numbers(K_PROD_KEEP, L, np.int64, 1, n_ff) if ptopk else np.zeros(L, np.int64)
    prod_keep_sparsity = scalar(K_PROD_KEEP_SPARSITY, float, 0.0, 1.0) if ptopk else 0.0
    layers = []
    for il in range(L):
        t = tuple(int(x) for x in types[3 * il:3 * il + 3])
        for part, qt in zip(PARTS, t):
            if part == "down" and qt in COLS_TYPES:
                if n_embd % COLS_BLOCK or n_ff % COLS_BLOCK:
                    raise FlashFormatError(f"{f.path}: layer {il} has column down parts ({COLS_NAMES[qt]}), "
                                           f"which need n_embd and n_ff multiples of {COLS_BLOCK}")
                continue
            if qt not in SUPPORTED:
                raise FlashFormatError(f"{f.path}: layer {il} {part} rows have ggml type {qt}, which this "
                                       f"engine does not implement")
            block = GGML_QUANT_SIZES[GGMLQuantizationType(qt)][0]
            if n_embd % block:
                raise FlashFormatError(f"{f.path}: layer {il} {part} rows of {n_embd} are not whole blocks "
                                       f"of {GGMLQuantizationType(qt).name}")
        pb = tuple(int(x) for x in nbytes[3 * il:3 * il + 3])
        want = tuple(part_bytes(q, n_embd) for q in t)
        if pb != want:
            raise FlashFormatError(f"{f.path}: layer {il} bundle parts {pb} bytes, types imply {want}")
        info = f.tensor(t_bundle(il))
        if info.n_bytes != n_ff * sum(pb) or info.n_rows != n_ff or info.offset % ALIGNMENT:
            raise FlashFormatError(f"{f.path}: {t_bundle(il)} has {info.n_bytes} bytes at offset "
                                   f"{info.offset}, expected {n_ff} rows of {sum(pb)} at a 4096 boundary")
        tensor(t_neuron_id(il), (n_ff,), (I32,), "I32")
        nid = np.asarray(f.array(t_neuron_id(il)), np.int32)
        _check_permutation(f, t_neuron_id(il), nid, "neurons")
        tensor(t_freq(il), (n_ff,), (F32,), "F32")
        freq = np.asarray(f.array(t_freq(il)), np.float32)
        if not np.isfinite(freq).all():
            raise FlashFormatError(f"{f.path}: {t_freq(il)} has a value that is not finite")
        # predictor factors stay float16 views into the map (not resident) until a runtime uses them
        a = b = bias = None
        r = int(ranks[il])
        if r == 0:      # no predictor for this layer: no tensors either
            for name in (t_pred_a(il), t_pred_b(il), t_pred_bias(il)):
                if name in f.tensors:
                    raise FlashFormatError(f"{f.path}: layer {il} has {K_RANK} 0 but a tensor {name}")
        else:
            tensor(t_pred_a(il), (r, n_embd), (F16,), "F16")
            tensor(t_pred_b(il), (n_ff, r), (F16,), "F16")
            tensor(t_pred_bias(il), (n_ff,), (F32,), "F32")
            a, b = f.array(t_pred_a(il)), f.array(t_pred_b(il))
            bias = np.asarray(f.array(t_pred_bias(il)), np.float32)
            if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(bias).all()):
                raise FlashFormatError(f"{f.path}: layer {il} predictor has a value that is not finite")
            for name in (t_pred_a(il), t_pred_b(il)):   # the check read them: not resident until used
                f.release_tensor(name)
        dn = pf = None
        if product:
            for name in (t_down_norm(il), t_prod_freq(il)):
                tensor(name, (n_ff,), (F32,), "F32")
            dn, pf = f.array(t_down_norm(il)), f.array(t_prod_freq(il))
            for name, v in ((t_down_norm(il), dn), (t_prod_freq(il), pf)):
                if not np.isfinite(v).all():
                    raise FlashFormatError(f"{f.path}: {name} has a value that is not finite")
        dscale, dmin = _read_down_tables(f, il, t[2], n_ff, n_embd, tensor)
        layers.append(FlashLayer(info.offset, sum(pb), t, pb, nid, freq, float(thresholds[il]), a, b, bias,
                                 float(recall[il]), float(precision[il]), bool(kinds[il]), float(offsets[il]),
                                 float(prod_thr[il]), dn, pf, int(keep[il]), int(prod_keep[il]), dscale, dmin))
    head_index = _read_head_index(f, cfg, scalar, tensor) if K_HI_MARGIN in f.meta else None
    head_order = _read_head_order(f, cfg.n_vocab, tensor) if T_HI_ORDER in f.tensors else None
    sha = f.get(K_SOURCE_SHA, "")
    source = f.get(K_CAL_SOURCE, "")
    cal_tokens = f.get(K_CAL_TOKENS, 0)
    return FlashInfo(version, activation, sparsity, layers, sha if isinstance(sha, str) else "",
                     int(cal_tokens) if isinstance(cal_tokens, int) else 0, source if isinstance(source, str) else "",
                     head_index, prod_sparsity, K_HI_Z in f.meta and K_HI_MARGIN not in f.meta, head_order,
                     keep_sparsity=keep_sparsity, prod_keep_sparsity=prod_keep_sparsity)


def _read_down_tables(f, il, down_type, n_ff, n_embd, tensor):
    """(scale, min) views of layer il's column-down tables, (None, None) when its down parts are a ggml
    type (and then neither tensor may exist); min is None for the kinds without one."""
    names = (t_down_scale(il), t_down_min(il))
    if down_type not in COLS_TYPES:
        for name in names:
            if name in f.tensors:
                raise FlashFormatError(f"{f.path}: layer {il} has {name} but its down parts are "
                                       f"{part_type_name(down_type)}")
        return None, None
    want = names if cols_has_min(down_type) else names[:1]
    out = []
    for name in want:
        if name not in f.tensors:
            raise FlashFormatError(f"{f.path}: layer {il} has {COLS_NAMES[down_type]} down parts but no tensor {name}")
        tensor(name, (n_embd, n_ff // COLS_BLOCK), (F16,), "F16")
        v = f.array(name)
        if not np.isfinite(v).all():
            raise FlashFormatError(f"{f.path}: {name} has a value that is not finite")
        f.release_tensor(name)   # the check read them: the runtime copies them (ffn.down_tables)
        out.append(v)
    if not cols_has_min(down_type) and names[1] in f.tensors:
        raise FlashFormatError(f"{f.path}: layer {il} has {names[1]}, which {COLS_NAMES[down_type]} does not use")
    return out[0], out[1] if len(out) > 1 else None


def _read_head_index(f, cfg, scalar, tensor) -> dict:
    """The head index's tensors (views into the map), checked against the model's shape."""
    n_embd, n_vocab = cfg.n_embd, cfg.n_vocab
    margin = scalar(K_HI_MARGIN, float, 0.0, 1e3)
    margin_dist = scalar(K_HI_MARGIN_DIST, float, 0.0, 1e3)
    held = scalar(K_HI_HELDOUT, int, 0, 1 << 31)
    frac = scalar(K_HI_READ, float, 0.0, 1.0)
    bfrac = scalar(K_HI_BYTES, float, 0.0, 1.0)
    info = tensor(T_HI_BASIS, None, (F32,), "F32")
    if len(info.ne) != 2 or info.ne[0] != n_embd or not 1 <= info.ne[1] <= n_embd:
        raise FlashFormatError(f"{f.path}: {T_HI_BASIS} has shape {list(info.ne)}, expected [{n_embd}, rank]")
    r = int(info.ne[1])
    tensor(T_HI_PREVIEW, (r, n_vocab), (I8,), "I8")
    tensor(T_HI_SCALE, (n_vocab,), (F16,), "F16")
    out = dict(margin=margin, margin_dist=margin_dist, heldout=held, read_frac=frac, bytes_frac=bfrac, rank=r)
    for key, name in HI_TENSORS.items():
        out[key] = f.array(name)
    for key in ("basis", "scale"):
        if not np.isfinite(out[key]).all():
            raise FlashFormatError(f"{f.path}: head_index.{key} has a value that is not finite")
    release_head_index(f)   # the check read them
    return out


def _read_head_order(f, n_vocab, tensor) -> np.ndarray:
    """(n_vocab,) int32 copy of head_index.order (stored head row -> token), checked to be a permutation.
    It describes the head tensor as stored, so it is read whether or not the index itself is usable."""
    tensor(T_HI_ORDER, (n_vocab,), (I32,), "I32")
    order = np.array(f.array(T_HI_ORDER), np.int32)
    f.release_tensor(T_HI_ORDER)
    _check_permutation(f, T_HI_ORDER, order, "tokens")
    return order


def _check_permutation(f, name, a, what) -> None:
    """FlashFormatError naming the file and tensor unless a (n,) holds each of 0..n-1 once."""
    if not np.array_equal(np.sort(a), np.arange(len(a))):
        raise FlashFormatError(f"{f.path}: {name} is not a permutation of {len(a)} {what}")


def release_down_tables(f, n_layer: int) -> None:
    """Drop the map's pages of the column-down tables from this process's RSS (the runtime's copies
    are what it uses)."""
    for il in range(n_layer):
        for name in (t_down_scale(il), t_down_min(il)):
            if name in f.tensors:
                f.release_tensor(name)


def release_head_index(f) -> None:
    """Drop the map's pages of the head index from this process's RSS (they stay in the page cache)."""
    for name in HI_TENSORS.values():
        f.release_tensor(name)
