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
        if kind in ("gate", "product"):
            self.gates = [self._read_part_rows(store, l, 0) for l in layers]   # (n_ff, gate_bytes) uint8 each
        if kind == "product":
            self.ups = [self._read_part_rows(store, l, 1) for l in layers]     # (n_ff, up_bytes) uint8 each
            self.down_norm = [np.array(l.down_norm, np.float32) for l in layers]   # (n_ff,) f32 copies
            self.hu = np.zeros(n_ff, np.float32)                               # (n_ff,) f32 up values
        elif kind == "predictor":
            self.tmp = np.zeros(max(l.rank for l in layers), np.float32)   # (r,) f32
            # (n_embd, r), (r, n_ff) uint16: the stored float16 bits, copied out of the map (resident,
            # 2 bytes a weight: plan.PlanInput.pred_bytes counts this)
            self.pred = [(np.array(l.pred_a).view(np.uint16), np.array(l.pred_b).view(np.uint16))
                         for l in layers]
            self.pred_bias = [_readonly_copy(l.pred_bias) for l in layers]   # copies, not map views

    def _read_part_rows(self, store, l, part):
        """One part (0 gate, 1 up) of every bundle row of one layer, read once (a strided read)."""
        g = l.part_bytes[part]
        buf = np.zeros((self.n_ff, g), np.uint8)
        store.select(l.bundle_offset + sum(l.part_bytes[:part]), g, self.n_ff, stride=l.bundle_bytes)
        rows = np.arange(self.n_ff, dtype=np.int32)
        store.read_rows(rows, buf, rows)
        return buf

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
