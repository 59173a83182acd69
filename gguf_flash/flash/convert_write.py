"""The flash GGUF's writing (convert.py, phase 4; docs/flash-gguf.md): the source's metadata and non-FFN
tensors byte for byte (the head in the head index's row order), then per layer the bundles (gate, up
copied; down columns re-quantized), neuron ids, frequencies, the product's norms and the predictors
(parked on disk until written), streamed tensor by tensor with the source's pages released as written."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, quants

from ..errors import InvalidArgumentError
from . import format as ff
from .convert_ram import NEURON_BLOCK, WRITE_BLOCK_BYTES
from .convert_stats import dequant_rows
from .down_cols import column_parts
from ..kernels.quant_cols import COLS_BLOCK, COLS_TYPES, cols_has_min
from .spill import Parked


def progress_bar(enabled, total, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="", leave=True, dynamic_ncols=True)


def write_flash(f, cfg, path, meta, orders, freq, progress):
    """Stream the flash GGUF: header and tensor infos first, then each tensor's data in order."""
    w = GGUFWriter(path, cfg.arch)
    w.add_custom_alignment(ff.ALIGNMENT)
    for key, value in f.meta.items():
        if key in ("general.architecture", "general.alignment"):
            continue
        vtype, itype = f.meta_types[key]
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, list(value) if isinstance(value, np.ndarray) else value, vtype,
                            sub_type=GGUFValueType(itype))
        else:
            w.add_key_value(key, value, vtype)
    L = cfg.n_layer
    preds = meta["preds"]
    w.add_uint32(ff.K_VERSION, meta["version"])
    w.add_string(ff.K_SOURCE_SHA, meta["sha"])
    w.add_array(ff.K_PARTS, list(ff.PARTS))
    w.add_key_value(ff.K_TYPES, [int(x) for x in meta["types"]], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    w.add_key_value(ff.K_BYTES, [int(x) for x in meta["bytes"]], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    w.add_string(ff.K_ACTIVATION, meta["act"])
    f32s = lambda key, xs: w.add_key_value(key, [float(x) for x in xs], GGUFValueType.ARRAY,  # noqa: E731
                                           GGUFValueType.FLOAT32)
    f32s(ff.K_THRESHOLD, meta["thresholds"])
    w.add_float32(ff.K_SPARSITY, meta["sparsity"])
    f32s(ff.K_LAYER_SPARSITY, meta["layer_sparsity"])
    # a layer without a predictor: rank 0, zeros in the other predictor keys, no predictor tensors
    w.add_key_value(ff.K_RANK, [int(p.rank) if p else 0 for p in preds], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    f32s(ff.K_RECALL, [p.recall if p else 0.0 for p in preds])
    f32s(ff.K_PRECISION, [p.precision if p else 0.0 for p in preds])
    w.add_key_value(ff.K_PRED_KIND, [int(p is not None and p.kind == "abs") for p in preds], GGUFValueType.ARRAY,
                    GGUFValueType.UINT32)
    f32s(ff.K_PRED_OFFSET, [p.offset if p else 0.0 for p in preds])
    w.add_uint32(ff.K_CAL_TOKENS, meta["cal_tokens"])
    w.add_string(ff.K_CAL_SOURCE, meta["source"])
    f32s(ff.K_CURVE_S, [s for s, _ in meta["curve"]])
    f32s(ff.K_CURVE_PPL, [p for _, p in meta["curve"]])
    pr = meta["product"]
    if pr is not None:
        f32s(ff.K_PROD_THRESHOLD, pr["thresholds"])
        w.add_float32(ff.K_PROD_SPARSITY, pr["sparsity"])
        f32s(ff.K_PROD_LAYER_SPARSITY, pr["layer_sparsity"])
        f32s(ff.K_PROD_CURVE_S, [s for s, _ in pr["curve"]])
        f32s(ff.K_PROD_CURVE_PPL, [p for _, p in pr["curve"]])
    # the per-token top-k rules (optional): keep per layer, its sparsity, its curve
    for rule, keys in (("topk", (ff.K_GATE_KEEP, ff.K_GATE_KEEP_SPARSITY, ff.K_KEEP_CURVE_S, ff.K_KEEP_CURVE_PPL)),
                       ("prod_topk", (ff.K_PROD_KEEP, ff.K_PROD_KEEP_SPARSITY, ff.K_PROD_KEEP_CURVE_S,
                                      ff.K_PROD_KEEP_CURVE_PPL))):
        tk = meta.get(rule)
        if tk is not None:
            w.add_key_value(keys[0], [int(k) for k in tk["keep"]], GGUFValueType.ARRAY, GGUFValueType.UINT32)
            w.add_float32(keys[1], tk["sparsity"])
            f32s(keys[2], [s for s, _ in tk["curve"]])
            f32s(keys[3], [p for _, p in tk["curve"]])
    hi = meta["head_index"]
    if hi is not None:
        w.add_float32(ff.K_HI_MARGIN, hi.margin)
        w.add_float32(ff.K_HI_MARGIN_DIST, hi.margin_dist)
        w.add_uint32(ff.K_HI_HELDOUT, hi.n_heldout)
        w.add_float32(ff.K_HI_READ, hi.read_frac)
        w.add_float32(ff.K_HI_BYTES, hi.bytes_frac)

    ffn = {f"blk.{il}.{p}.weight" for il in range(L) for p in ("ffn_gate", "ffn_up", "ffn_down")}
    # the head (and so a tied embedding) is stored in the head index's row order
    head_name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    order = hi.order if hi is not None else None
    plan = []   # (producer, source tensors it reads) in file order: their pages are released once written
    for name, info in f.tensors.items():
        if name in ffn:
            continue
        if info.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.I32):
            arr = f.array(name)
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        else:
            arr = f.raw(name)
            w.add_tensor_info(name, arr.shape, np.uint8, arr.nbytes, raw_dtype=GGMLQuantizationType(info.qtype))
        rows_order = order if name == head_name else None
        plan.append((lambda a=arr, n=name, o=rows_order: _RowBlocks(a, o, lambda: f.release_tensor(n)),
                     [name]))
    tables = {}   # (layer, 0 scale / 1 min) -> a column-down table, made with the bundles, dropped once written
    for il in range(L):
        bb = sum(meta["bytes"][3 * il:3 * il + 3])
        p = preds[il]
        down_q = int(meta["types"][3 * il + 2])
        w.add_tensor_info(ff.t_bundle(il), (cfg.n_ff, bb), np.dtype(np.int8), cfg.n_ff * bb)
        plan.append((lambda il=il, dq=down_q: _bundle(f, cfg, il, orders[il], dq, tables).view(np.int8),
                     [f"blk.{il}.{p}.weight" for p in ("ffn_gate", "ffn_up", "ffn_down")]))
        if down_q in COLS_TYPES:
            nb = cfg.n_ff // COLS_BLOCK
            for k, name in enumerate((ff.t_down_scale(il), ff.t_down_min(il))[:1 + cols_has_min(down_q)]):
                w.add_tensor_info(name, (nb, cfg.n_embd), np.dtype(np.float16), nb * cfg.n_embd * 2)
                plan.append((lambda il=il, k=k: tables.pop((il, k)), []))
        w.add_tensor_info(ff.t_neuron_id(il), (cfg.n_ff,), np.dtype(np.int32), cfg.n_ff * 4)
        plan.append((lambda il=il: orders[il].astype(np.int32), []))
        w.add_tensor_info(ff.t_freq(il), (cfg.n_ff,), np.dtype(np.float32), cfg.n_ff * 4)
        plan.append((lambda il=il: freq[il], []))
        if pr is not None:   # in stored (hot-first) row order
            w.add_tensor_info(ff.t_down_norm(il), (cfg.n_ff,), np.dtype(np.float32), cfg.n_ff * 4)
            plan.append((lambda il=il: pr["down_norm"][il][orders[il]].astype(np.float32), []))
            w.add_tensor_info(ff.t_prod_freq(il), (cfg.n_ff,), np.dtype(np.float32), cfg.n_ff * 4)
            plan.append((lambda il=il: pr["freq"][il].astype(np.float32), []))
        if p is None:
            continue
        w.add_tensor_info(ff.t_pred_a(il), p.A.shape, np.dtype(np.float16), p.A.size * 2)
        plan.append((p.A.load, []))
        w.add_tensor_info(ff.t_pred_b(il), p.B.shape, np.dtype(np.float16), p.B.size * 2)
        plan.append((p.B.load, []))
        w.add_tensor_info(ff.t_pred_bias(il), p.bias.shape, np.dtype(np.float32), p.bias.size * 4)
        plan.append((lambda bias=p.bias: bias, []))
    if hi is not None:
        for name, arr in ((ff.T_HI_BASIS, hi.basis), (ff.T_HI_PREVIEW, hi.preview), (ff.T_HI_SCALE, hi.scale),
                          (ff.T_HI_ORDER, hi.order)):
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
            plan.append((lambda a=arr: a, []))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = progress_bar(progress, len(plan), "write")
    for produce, reads in plan:
        data = produce()
        w.write_tensor_data(data if isinstance(data, _RowBlocks) else np.ascontiguousarray(data))
        for name in reads:
            f.release_tensor(name)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    w.close()


class _RowBlocks:
    """A source tensor for GGUFWriter.write_tensor_data (which takes .nbytes and .tofile), written a block
    of rows at a time, in `order` (ORDER_ROWS rows a block: never as one permuted copy, 171 MiB for Gemma
    3's head) or as stored (BLOCK_BYTES a block), and the source's pages released after each block
    (`release`: GGUFFile.release of the tensor). Written whole, a tensor's pages stayed resident until
    its end: the head's (rows permuted: pages all over it) were the write phase's peak on Gemma 3, and
    an untied embedding's would be on a model with one. ORDER_ROWS is small because a fault on a mapped
    file maps the pages around it too (fault-around, large page-cache folios): Gemma 3's 171 MiB head
    written in the head index's order, RSS sampled every 2 ms over the write: +143 MiB at 4096 rows a
    block, +42 at 256, +24 at 64 (twice as slow)."""
    ORDER_ROWS = 256
    BLOCK_BYTES = WRITE_BLOCK_BYTES

    def __init__(self, a, order=None, release=None):
        self.a, self.order, self.nbytes = a, order, a.nbytes
        self.release = release or (lambda: None)

    def tofile(self, fout):
        if self.order is not None:
            for i0 in range(0, len(self.order), self.ORDER_ROWS):
                np.ascontiguousarray(self.a[self.order[i0:i0 + self.ORDER_ROWS]]).tofile(fout)
                self.release()
            return
        flat = np.ascontiguousarray(self.a).reshape(-1).view(np.uint8)     # the tensor's bytes, as stored
        for i0 in range(0, len(flat), self.BLOCK_BYTES):
            flat[i0:i0 + self.BLOCK_BYTES].tofile(fout)
            self.release()


@dataclass
class StoredPredictor:
    """A trained predictor as the flash file stores it, its factors parked until written (spill.py)."""
    rank: int
    recall: float
    precision: float
    kind: str
    offset: float
    n_bytes: int
    A: Parked              # (n_embd, r) float16
    B: Parked              # (r, n_ff) float16, columns in the stored (hot-first) row order
    bias: np.ndarray       # (n_ff,) float32, in the stored order


def as_stored(p, order, spill) -> StoredPredictor:
    """p's columns in the stored (hot-first) row order, so predicted rows index bundles; A, B balanced,
    float16, parked in `spill`."""
    A, B = _balanced(p.A, p.B[:, order])
    return StoredPredictor(p.rank, p.recall, p.precision, p.kind, p.offset, p.n_bytes,
                            spill.put(A.astype(np.float16)), spill.put(B.astype(np.float16)),
                            p.bias[order].astype(np.float32))


def _balanced(A, B):
    """(A diag(s), diag(1/s) B) with equal column/row norms: the same product, and both factors
    inside float16's range (a trained factor pair can drift to scales F16 cannot hold)."""
    na = np.linalg.norm(A, axis=0) + 1e-12                       # (r,)
    nb = np.linalg.norm(B, axis=1) + 1e-12                       # (r,)
    s = np.sqrt(nb / na).astype(np.float32)
    A, B = A * s[None, :], B / s[:, None]
    if max(np.abs(A).max(), np.abs(B).max()) >= 65504:
        raise InvalidArgumentError("predictor weights exceed float16 range even after balancing")
    return np.ascontiguousarray(A, np.float32), np.ascontiguousarray(B, np.float32)


def _bundle(f, cfg, il, order, down_q, tables) -> np.ndarray:
    """(n_ff, bundle_bytes) uint8: row i = gate[order[i]] | up[order[i]] | down[:, order[i]], the down
    column re-quantized as a row of down_q, or in the source's codes for a column kind (down_cols.py;
    its scale and min tables then go to tables[(il, 0)] and tables[(il, 1)])."""
    gate = f.raw(f"blk.{il}.ffn_gate.weight")                     # (n_ff, gate_bytes)
    up = f.raw(f"blk.{il}.ffn_up.weight")                         # (n_ff, up_bytes)
    if down_q in COLS_TYPES:
        codes, tables[(il, 0)], dmin = column_parts(f, il, order, down_q, cfg.n_embd, cfg.n_ff)
        if dmin is not None:
            tables[(il, 1)] = dmin
        return np.concatenate([gate[order], up[order], codes], axis=1)
    down_q = GGMLQuantizationType(down_q)
    down_cols = np.empty((cfg.n_ff, cfg.n_embd), np.float32)      # (n_ff, n_embd): down's columns, stored order
    for r0 in range(0, cfg.n_embd, NEURON_BLOCK):
        D = dequant_rows(f, f"blk.{il}.ffn_down.weight", r0, r0 + NEURON_BLOCK)   # (<= block, n_ff)
        down_cols[:, r0:r0 + len(D)] = D.T[order]
    g, u = gate.shape[1], up.shape[1]
    out = np.empty((cfg.n_ff, g + u + ff.part_bytes(int(down_q), cfg.n_embd)), np.uint8)
    out[:, :g] = gate[order]
    out[:, g:g + u] = up[order]
    for r0 in range(0, cfg.n_ff, NEURON_BLOCK):   # quantized a block of rows at a time: gguf.quants'
        rows = down_cols[r0:r0 + NEURON_BLOCK]    # temporaries are a few times what they quantize
        if down_q == GGMLQuantizationType.F32:
            dq = rows.view(np.uint8)
        elif down_q == GGMLQuantizationType.F16:
            dq = rows.astype(np.float16).view(np.uint8)
        else:
            dq = quants.quantize(rows, down_q)                    # (<= block, down_bytes)
        out[r0:r0 + len(rows), g + u:] = dq.reshape(len(rows), -1)
    return out
