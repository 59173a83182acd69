"""Which FFN neurons a token needs: exact gate values from resident gate rows (CATS/TEAL-style
|act(gate . x)| > t_l), or the product of resident gate and up rows (|act(gate . x) (up . x)| ||down_i||
> t'_l: the neuron's own contribution, a better criterion at the same sparsity; only the down part of a
chosen row is then read), or the low-rank predictor (DESIGN.md 1) where the gate rows do not fit, or
nothing resident ("bundle", and "none" in naive/dense mode): every row, its gate computed from the
bundle by the sparse FFN, which still skips |act(g)| <= t_l.
The Selector holds each kind's resident arrays; kernels/flashstep.select_rows computes the choice into
`active[:n]` (increasing stored row ids) and `gvals[:n]`: their activated gate values act(g) (gate rows)
or their values act(g) u (product), and returns what gvals holds (sparse.KNOWN_*)."""

from __future__ import annotations

import numpy as np

from ..kernels import dispatch, flashstep, sparse


class Selector:
    def __init__(self, kind: str, layers, store, n_ff: int, activation: int, tset):
        self.kind, self.layers, self.n_ff, self.act = kind, layers, n_ff, activation
        self.tset = tset                                # the bundle parts' (runtime.chunk_tset)
        self.active = np.arange(n_ff, dtype=np.int32)   # (n_ff,) int32 chosen rows (all unless selecting)
        self.gvals = np.zeros(n_ff, np.float32)         # (n_ff,) f32 act(gate) or act(gate) * up (see above)
        self.z = np.zeros(n_ff, np.float32)             # (n_ff,) f32 predictor logits
        # each kind's resident arrays, every layer's in one flat buffer (a view per layer): the one-call
        # token (flashstep.layers_held) takes a layer's by offsets instead of a tuple of n_layer arrays
        if kind in ("gate", "product"):
            self.gate_buf, self.gate_off, self.gates = self._read_parts(store, layers, 0)   # (n_ff, gate_bytes) views
        if kind == "product":
            self.up_buf, self.up_off, self.ups = self._read_parts(store, layers, 1)         # (n_ff, up_bytes) views
            self.down_norm = np.array([l.down_norm for l in layers], np.float32)   # (n_layer, n_ff) f32 copy
            self.hu = np.zeros(n_ff, np.float32)                                   # (n_ff,) f32 up values
        elif kind == "predictor":
            self.tmp = np.zeros(max(l.rank for l in layers), np.float32)   # (r,) f32
            # (n_embd, r), (r, n_ff) uint16 views: the stored float16 bits, copied out of the map (resident,
            # 2 bytes a weight: plan.PlanInput.pred_bytes counts this)
            self.pa_buf, self.pa_off, pa = _flat_copy([np.asarray(l.pred_a).view(np.uint16) for l in layers])
            self.pb_buf, self.pb_off, pb = _flat_copy([np.asarray(l.pred_b).view(np.uint16) for l in layers])
            self.pred = list(zip(pa, pb))
            self.pred_bias = _readonly_copy([l.pred_bias for l in layers])   # (n_layer, n_ff) copy, not map views

    def _read_parts(self, store, layers, part):
        """One part (0 gate, 1 up) of every bundle row of every layer, read once a layer (a strided read)
        into one buffer: (buffer (total,) uint8, offsets (n_layer + 1,) int64, per layer a (n_ff,
        part_bytes) view)."""
        sizes = [self.n_ff * l.part_bytes[part] for l in layers]
        off = np.cumsum([0] + sizes).astype(np.int64)
        buf = np.zeros(int(off[-1]), np.uint8)
        views = []
        rows = np.arange(self.n_ff, dtype=np.int32)
        for il, l in enumerate(layers):
            g = l.part_bytes[part]
            v = buf[off[il]:off[il + 1]].reshape(self.n_ff, g)
            store.select(l.bundle_offset + sum(l.part_bytes[:part]), g, self.n_ff, stride=l.bundle_bytes)
            store.read_rows(rows, v, rows)
            views.append(v)
        return buf, off, views

    def step_args(self, il) -> tuple:
        """Layer il's selector as kernels/flashstep.layer_select takes it: (kind, gates, gate type, ups,
        up type, down norms, A, B, bias, logits, scratch, offset, absolute, threshold); what the kind
        does not use is a 1-element stand-in of the same type (one compiled specialization for all)."""
        return selector_args(self, il)

    def chunk(self, il, HG, HU, MK, XB, XR):
        """A prompt chunk's choices: MK (T, n_ff) uint8 = 1 where token j chooses row i; with gate rows
        resident HG (T, n_ff) f32 receives the gate values (one matrix product over XB, or over XR, the
        inputs as 8-bit blocks, for the types whose decode dot reads those), with the product the values
        act(g) u (HU (T, n_ff) f32 scratch for u). Returns what HG holds (sparse.KNOWN_*)."""
        if self.kind in ("none", "bundle"):
            MK[:] = 1
            return sparse.KNOWN_NONE
        l = self.layers[il]
        if self.kind in ("gate", "product"):
            sparse.gate_chunk(HG, self.gates[il], int(l.types[0]), XR if _q8x(l.types[0]) else XB, self.tset)
            if self.kind == "gate":
                sparse.mask_by_gate(MK, HG, self.act, gate_rule(l), self.z)
                return sparse.KNOWN_GATE
            sparse.gate_chunk(HU, self.ups[il], int(l.types[1]), XR if _q8x(l.types[1]) else XB, self.tset)
            sparse.mask_by_product(MK, HG, HU, self.down_norm[il], self.act, product_rule(l), self.z)
            return sparse.KNOWN_H
        a, b = self.pred[il]
        for j in range(XB.shape[0]):
            sparse.predictor_logits(self.z, self.tmp[:a.shape[1]], XB[j], a, b, self.pred_bias[il])
            sparse.mask_by_logit(MK[j], self.z, l.pred_offset, l.pred_abs)
        return sparse.KNOWN_NONE


def gate_rule(l) -> float:
    """The gate-rows selector's rule for layer info l, as the kernels take it: the threshold t_l, or
    -keep for the per-token top-k rule (l.keep > 0: each token chooses its own keep largest
    |act(gate . x)|; format.K_GATE_KEEP)."""
    return -float(l.keep) if l.keep > 0 else float(l.threshold)


def product_rule(l) -> float:
    """The product selector's rule for layer info l: t'_l, or -prod_keep for its per-token top-k rule
    (format.K_PROD_KEEP)."""
    return -float(l.prod_keep) if l.prod_keep > 0 else float(l.prod_threshold)


def _q8x(qt) -> bool:
    """The types whose decode dot reads the input as 8-bit blocks (so a chunk's product uses XR)."""
    return int(qt) in dispatch.Q8X



def held_selector_args(sel, n_layer) -> tuple:
    """Every layer's selector as kernels/flashstep.layers_held takes it: (kind, gate types, up types,
    logits buffer, offsets, absolute, thresholds; the scalars as arrays over the layers), then the
    resident arrays as flat buffers and offsets: (gate buffer, offsets; the same for up; down norms
    (n_layer, n_ff); A buffer, offsets, B buffer, offsets; bias (n_layer, n_ff) read-only; scratch; a
    uint8 and a uint16 (1, 1) stand-in for what the kind does not use: empty ranges). sel None: all
    stand-ins (kernel preloading)."""
    per = [selector_args(sel, il) for il in range(n_layer)]
    col = lambda k: np.array([p[k] for p in per])                  # noqa: E731
    kind = sel.kind if sel is not None else "none"
    z_off = np.zeros(n_layer + 1, np.int64)
    u8, u16 = np.zeros(1, np.uint8), np.zeros(1, np.uint16)
    gates = (sel.gate_buf, sel.gate_off) if kind in ("gate", "product") else (u8, z_off)
    ups = (sel.up_buf, sel.up_off) if kind == "product" else (u8, z_off)
    dn = sel.down_norm if kind == "product" else np.zeros((n_layer, 1), np.float32)
    if kind == "predictor":
        pred = (sel.pa_buf, sel.pa_off, sel.pb_buf, sel.pb_off, sel.pred_bias, sel.tmp)
    else:
        pred = (u16, z_off, u16, z_off, _readonly_copy(np.zeros((n_layer, 1))), np.zeros(1, np.float32))
    return (_KINDS[kind], col(2).astype(np.int64), col(4).astype(np.int64), per[0][9], col(11).astype(np.float64),
            col(12).astype(np.bool_), col(13).astype(np.float64),
            *gates, *ups, dn, *pred,
            np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.uint16))


def _flat_copy(arrays) -> tuple:
    """Copies of same-dtype arrays in one flat buffer: (buffer, offsets (n + 1,) int64, views shaped as
    the arrays), each copied in place (no second copy of them all at once)."""
    off = np.cumsum([0] + [a.size for a in arrays]).astype(np.int64)
    buf = np.empty(int(off[-1]), arrays[0].dtype)
    views = []
    for i, a in enumerate(arrays):
        v = buf[off[i]:off[i + 1]].reshape(a.shape)
        v[...] = a
        views.append(v)
    return buf, off, views


def _readonly_copy(a) -> np.ndarray:
    """A float32 copy, read-only like the file map's views: the compiled kernels' argument type stays."""
    c = np.array(a, np.float32)
    c.flags.writeable = False
    return c


_KINDS = {"none": flashstep.SEL_NONE, "bundle": flashstep.SEL_NONE, "gate": flashstep.SEL_GATE,
          "product": flashstep.SEL_PRODUCT, "predictor": flashstep.SEL_PREDICTOR}


def selector_args(sel, il) -> tuple:
    """Selector.step_args; sel None: the stand-ins alone (kernel preloading)."""
    u8, f32 = np.zeros((1, 1), np.uint8), np.zeros(1, np.float32)
    gates = ups = u8
    gt = ut = 0
    dn, pa, pb, pbias, ptmp, off, absolute, t = f32, np.zeros((1, 1), np.uint16), np.zeros((1, 1), np.uint16), \
        _readonly_copy(f32), f32, 0.0, True, 0.0
    kind = flashstep.SEL_NONE
    if sel is not None:
        kind = _KINDS[sel.kind]
        if sel.kind != "none":
            l = sel.layers[il]
            t = product_rule(l) if sel.kind == "product" else gate_rule(l) if sel.kind == "gate" else \
                float(l.threshold)
            if sel.kind in ("gate", "product"):
                gates, gt = sel.gates[il], int(l.types[0])
            if sel.kind == "product":
                ups, ut, dn = sel.ups[il], int(l.types[1]), sel.down_norm[il]
            if sel.kind == "predictor":
                pa, pb = sel.pred[il]
                pbias, ptmp = sel.pred_bias[il], sel.tmp[:pa.shape[1]]
                off, absolute = float(l.pred_offset), bool(l.pred_abs)
    z = sel.z if sel is not None else f32
    return (kind, gates, gt, ups, ut, dn, pa, pb, pbias, z, ptmp, off, absolute, t)
