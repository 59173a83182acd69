"""Which FFN neurons a token needs: exact gate values from resident gate rows (CATS/TEAL-style
|act(gate . x)| > t_l), or the low-rank predictor (DESIGN.md 1) where the gate rows do not fit, or
nothing resident ("bundle", and "none" in naive/dense mode): every row, its gate computed from the
bundle by the sparse FFN, which still skips |act(g)| <= t_l.
Fills `active[:n]` (increasing stored row ids) and, with gate rows, `gvals[:n]` (their gate values)."""

from __future__ import annotations

import numpy as np

from ..kernels import dispatch, sparse


class Selector:
    def __init__(self, kind: str, layers, store, n_ff: int, activation: int):
        self.kind, self.layers, self.n_ff, self.act = kind, layers, n_ff, activation
        self.active = np.arange(n_ff, dtype=np.int32)   # (n_ff,) int32 chosen rows (all unless selecting)
        self.gvals = np.zeros(n_ff, np.float32)         # (n_ff,) f32 their gate values (gate rows)
        self.z = np.zeros(n_ff, np.float32)             # (n_ff,) f32 predictor logits
        if kind == "gate":
            self.gates = [self._read_gate_rows(store, l) for l in layers]   # (n_ff, gate_bytes) uint8 each
        elif kind == "predictor":
            self.tmp = np.zeros(max(l.rank for l in layers), np.float32)   # (r,) f32
            # (n_embd, r), (r, n_ff) uint16: the stored float16 bits, copied out of the map (resident,
            # 2 bytes a weight: plan.PlanInput.pred_bytes counts this)
            self.pred = [(np.array(l.pred_a).view(np.uint16), np.array(l.pred_b).view(np.uint16))
                         for l in layers]
            self.pred_bias = [_readonly_copy(l.pred_bias) for l in layers]   # copies, not map views

    def _read_gate_rows(self, store, l):
        """The gate part of every bundle row of one layer, read once (a strided read of the bundles)."""
        g = l.part_bytes[0]
        buf = np.zeros((self.n_ff, g), np.uint8)
        store.select(l.bundle_offset, g, self.n_ff, stride=l.bundle_bytes)
        rows = np.arange(self.n_ff, dtype=np.int32)
        store.read_rows(rows, buf, rows)
        return buf

    def __call__(self, il, hg, xb, xq):
        """Returns (n, gate values known). hg (n_ff,) f32 scratch."""
        if self.kind in ("none", "bundle"):
            return self.n_ff, False
        l = self.layers[il]
        if self.kind == "gate":
            sparse.matvec_rows(hg, self.gates[il], int(l.types[0]), xb, xq)
            return sparse.select_by_gate(self.active, self.gvals, hg, self.act, l.threshold), True
        a, b = self.pred[il]
        sparse.predictor_logits(self.z, self.tmp[:a.shape[1]], xb, a, b, self.pred_bias[il])
        return sparse.select_by_logit(self.active, self.z, l.pred_offset, l.pred_abs), False

    def chunk(self, il, HG, MK, XB, XR):
        """A prompt chunk's choices: MK (T, n_ff) uint8 = 1 where token j chooses row i; with gate rows
        resident HG (T, n_ff) f32 receives the gate values (one matrix product over XB, or over XR, the
        inputs as 8-bit blocks, for the types whose decode dot reads those) and True is returned."""
        if self.kind in ("none", "bundle"):
            MK[:] = 1
            return False
        l = self.layers[il]
        if self.kind == "gate":
            q8x = int(l.types[0]) in (dispatch.Q4_0, dispatch.Q4_1, dispatch.Q5_0, dispatch.Q5_1, dispatch.Q8_0)
            sparse.gate_chunk(HG, self.gates[il], int(l.types[0]), XR if q8x else XB)
            sparse.mask_by_gate(MK, HG, self.act, l.threshold)
            return True
        a, b = self.pred[il]
        for j in range(XB.shape[0]):
            sparse.predictor_logits(self.z, self.tmp[:a.shape[1]], XB[j], a, b, self.pred_bias[il])
            sparse.mask_by_logit(MK[j], self.z, l.pred_offset, l.pred_abs)
        return False



def _readonly_copy(a) -> np.ndarray:
    """A float32 copy, read-only like the file map's views: the compiled kernels' argument type stays."""
    c = np.array(a, np.float32)
    c.flags.writeable = False
    return c
