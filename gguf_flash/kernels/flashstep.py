"""The flash runtime's decode step for one layer as two compiled calls (issue 15), with the reads between:

  layer_select  attention, the FFN norm, the input as 8-bit blocks, the selector (resident gate rows,
                gate and up rows, the predictor, or every row), and the split of the chosen rows between
                the window and the staging buffer;
  (Python)      the window's update and the reads of what it lacks (flash/ffn.py);
  layer_ffn     the sparse FFN over the rows held, the parts' sum, the residual add.

A token with nothing to read that takes every row (bundle rows or dense mode, every window holding all
of its rows) is one call, layers_held: the same two calls per layer inside it.
Before, the runtime made ten compiled calls per layer with Python between each (SmolLM2: ~2 ms of a
~9 ms token with every row resident). The arguments are the runtime's own buffers (runtime.py builds
each layer's tuple once); the selector's arrays that a kind does not use are 1-element stand-ins of the
same types, so one specialization serves every selector.
"""

import numpy as np
from numba import njit

from .dispatch import quantize_x
from .forward import FP_EPS, IP_ACT, IP_N_LAYER, IP_POST_NORMS, NORM_FFN, NORM_POST_FFW, attention_layer, residual_add
from .nn import FASTMATH, gate_rule, product_rule, rmsnorm
from .quant_cols import COLS_U4, add_block_mins
from .sparse import (KNOWN_GATE, KNOWN_H, KNOWN_NONE, matvec_rows, predictor_logits, select_by_gate,
                     select_by_logit, select_by_product, sparse_ffn_range, sum_partials)

# the selector (flash/selector.py) as layer_select sees it
SEL_NONE, SEL_GATE, SEL_PRODUCT, SEL_PREDICTOR = range(4)


@njit(cache=True)
def split_rows(win_rows, ovf_pos, active, n, neuron_slot, capacity):
    """Rows the window keeps (hits, then misses while there is room, lowest row = hottest first) into
    win_rows, and the positions in `active` of the rest (the overflow) into ovf_pos; returns
    (n_win, n_ovf). win_rows, ovf_pos (n_ff,) int32; capacity 0 (no window): everything overflows."""
    hits = 0
    for j in range(n):
        if neuron_slot[active[j]] >= 0:
            hits += 1
    free = capacity - hits
    nw = 0
    no = 0
    for j in range(n):
        a = active[j]
        if neuron_slot[a] >= 0 or free > 0:
            if neuron_slot[a] < 0:
                free -= 1
            win_rows[nw] = a
            nw += 1
        else:
            ovf_pos[no] = j
            no += 1
    return nw, no


@njit(cache=True, fastmath=FASTMATH)
def select_rows(xb, xq_embd, act, kind, gates, gate_type, ups, up_type, down_norm, pa, pb, pbias, pz, ptmp,
                pred_offset, pred_abs, sel_threshold, hg, hu, active, gvals, neuron_slot, win_rows, ovf_pos,
                capacity, ptsets):
    """The selector on the FFN input xb (xq_embd: its 8-bit blocks): active[:n] (increasing rows) and
    gvals[:n] (what the selector computed for them, known) as flash/selector.py describes; win_rows[:nw]
    the rows the window is to hold (capacity slots, neuron_slot its map) and ovf_pos[:no] the positions
    of the rest. Returns (n, known, nw, no). kind SEL_NONE leaves active as it is (every row:
    0..n_ff-1) and n = len(active). ptsets: the bundle parts' type sets (the resident gate and up rows
    have the gate's and the up's types). capacity -1 (layers_held: every row is in the window): no
    split, nw = n and no = 0 (its two passes over SmolLM2's 1536 rows: ~2 us a layer, 1% of the step)."""
    known = KNOWN_NONE
    if kind == SEL_GATE:
        matvec_rows(hg, gates, gate_type, xb, xq_embd, ptsets[0])
        # a negative sel_threshold is the per-token top-k rule (scratch: pz, the predictor's logits)
        n = select_by_gate(active, gvals, hg, act, gate_rule(sel_threshold, hg, act, pz))
        known = KNOWN_GATE
    elif kind == SEL_PRODUCT:
        matvec_rows(hg, gates, gate_type, xb, xq_embd, ptsets[0])
        matvec_rows(hu, ups, up_type, xb, xq_embd, ptsets[1])
        n = select_by_product(active, gvals, hg, hu, down_norm, act,
                              product_rule(sel_threshold, hg, hu, down_norm, act, pz))
        known = KNOWN_H
    elif kind == SEL_PREDICTOR:
        predictor_logits(pz, ptmp, xb, pa, pb, pbias)
        n = select_by_logit(active, pz, pred_offset, pred_abs)
    else:
        n = active.shape[0]
    if capacity < 0:
        return n, known, n, 0
    nw, no = split_rows(win_rows, ovf_pos, active, n, neuron_slot, capacity)
    return n, known, nw, no


@njit(cache=True, fastmath=FASTMATH)
def layer_select(x, xb, q, k, v, att, scores, k_cache, v_cache, cos, sin, xq_embd, xq_q,
                 blob, mats, norms, qk_norms, biases, swa, ip, fp, il,
                 kind, gates, gate_type, ups, up_type, down_norm, pa, pb, pbias, pz, ptmp, pred_offset, pred_abs,
                 sel_threshold, hg, hu, active, gvals, neuron_slot, win_rows, ovf_pos, pos, capacity, tset, ptsets):
    """Layer il up to its chosen rows: x += attention; xb = RMSNorm(x) * ffn_norm and xq_embd its 8-bit
    blocks; then select_rows. Returns (n, known, nw, no). tset: the model's type set (attention);
    ptsets: the bundle parts' (dispatch.part_type_sets)."""
    attention_layer(x, xb, q, k, v, att, scores, k_cache, v_cache, cos, sin, xq_embd, xq_q,
                    blob, mats, norms, qk_norms, biases, swa, ip, fp, il, pos, tset)
    rmsnorm(xb, x, norms[il, NORM_FFN], fp[FP_EPS])
    quantize_x(xq_embd, xb)
    return select_rows(xb, xq_embd, ip[IP_ACT], kind, gates, gate_type, ups, up_type, down_norm, pa, pb, pbias,
                       pz, ptmp, pred_offset, pred_abs, sel_threshold, hg, hu, active, gvals, neuron_slot,
                       win_rows, ovf_pos, capacity, ptsets)


@njit(cache=True, fastmath=FASTMATH)
def layer_ffn(x, out, partial, hsum, fresh, slots, neuron_slot, stage, stage_map, active, n, j0, gvals, known,
              xb, xq, types, offs, dtab, act, threshold, post_w, eps, post_norm, ptsets):
    """The rest of layer il's FFN and its residual: partial (zeroed first when fresh) += positions
    j0..n-1 of active (sparse.sparse_ffn_range: window slots and staging), out = the parts' sum,
    x += out (post-normed where the model does), the mins of COLS_U4 down parts added once per block.
    dtab, hsum: the layer's column-down tables and the per-block sums of h (sparse.sparse_ffn_range);
    ptsets: the bundle parts' type sets."""
    if fresh:
        partial[:] = 0.0
        hsum[:] = 0.0
    if j0 < n:
        sparse_ffn_range(partial, hsum, slots, neuron_slot, stage, stage_map, active, n, j0, n, gvals, known,
                         xb, xq, types, offs, dtab, act, threshold, ptsets)
    sum_partials(out, partial)
    if types[2] == COLS_U4:
        add_block_mins(out, dtab[0], dtab[1], hsum)
    residual_add(x, out, post_w, eps, post_norm)


@njit(cache=True, fastmath=FASTMATH)
def layers_held(x, xb, q, k, v, att, scores, k_cache, v_cache, cos, sin, xq_embd, xq_q,
                blob, mats, norms, qk_norms, biases, swa, ip, fp,
                kind, gates, gate_type, ups, up_type, down_norm, pa, pb, pbias, pz, ptmp, pred_offset, pred_abs,
                sel_threshold, hg, hu, active, gvals, win_rows, ovf_pos, out, partial, hsum, stage, stage_map,
                slots, neuron_slot, last_active, types, offs, dtabs, thresholds, pos, t, tset, ptsets):
    """Every layer of a decode step in one call, when nothing is to be read: each layer's window holds all
    of its rows and the selector takes every row (kind SEL_NONE: bundle rows, dense mode), so each layer
    is layer_select, the window's update and layer_ffn with nothing between them. The window's update is
    then exactly "each row active at t" (no row is missing, none can be evicted): last_active[il][row] =
    t. slots, neuron_slot, last_active: (n_layer,) tuples of the windows' arrays; types (n_layer, 3),
    offs (n_layer, 4) int64; dtabs (n_layer,) tuple of the layers' column-down tables; thresholds
    (n_layer,) f32 the FFN kernels' gate rule. The rest as layer_select and layer_ffn take them. Returns
    the rows computed over all layers. The same calls in the same order as the per-layer path: the logits
    are bitwise the same. The constants it passes are typed as the per-layer path's arguments
    (np.int64(-1), not -1): a literal argument compiles a callee again for its value (each of
    layer_select, layer_ffn and sparse_ffn_range twice, ~7 s of a flash file's first-run compile)."""
    total = 0
    for il in range(ip[IP_N_LAYER]):
        ns, la = neuron_slot[il], last_active[il]
        n, known, nw, no = layer_select(x, xb, q, k, v, att, scores, k_cache, v_cache, cos, sin, xq_embd, xq_q,
                                        blob, mats, norms, qk_norms, biases, swa, ip, fp, il,
                                        kind, gates, gate_type, ups, up_type, down_norm, pa, pb, pbias, pz, ptmp,
                                        pred_offset, pred_abs, sel_threshold, hg, hu, active, gvals, ns, win_rows,
                                        ovf_pos, pos, np.int64(-1), tset, ptsets)
        for j in range(n):
            la[active[j]] = t
        layer_ffn(x, out, partial, hsum, np.bool_(True), slots[il], ns, stage, stage_map, active, n, np.int64(0),
                  gvals, known, xb, xq_embd, types[il], offs[il], dtabs[il], ip[IP_ACT], thresholds[il],
                  norms[il, NORM_POST_FFW], fp[FP_EPS], ip[IP_POST_NORMS], ptsets)
        total += n
    return total
