"""The flash runtime's decode step for one layer as two compiled calls (issue 15), with the reads between:

  layer_select  attention, the FFN norm, the input as 8-bit blocks, the selector (resident gate rows,
                gate and up rows, the predictor, or every row), and the split of the chosen rows between
                the window and the staging buffer;
  (Python)      the window's update and the reads of what it lacks (flash/ffn.py);
  layer_ffn     the sparse FFN over the rows held, the parts' sum, the residual add.

Without a cap, the layers of a token run in one call, layers_held (the same two calls per layer inside
it), up to a layer whose chosen rows are not all in its window: Python reads them and runs that layer's
FFN, then calls again from the next layer. Bundle rows or dense mode, every window holding all of its
rows, is one call a token; the selectors' first tokens stop where rows are missing.
Before, the runtime made ten compiled calls per layer with Python between each (SmolLM2: ~2 ms of a
~9 ms token with every row resident). The arguments are the runtime's own buffers (runtime.py builds
each layer's tuple once); the selector's arrays that a kind does not use are 1-element stand-ins of the
same types, so one specialization serves every selector.
"""

import numpy as np
from numba import njit

from .dispatch import quantize_x
from .forward import (FP_EPS, IP_ACT, IP_N_EMBD, IP_N_FF, IP_N_LAYER, IP_POST_NORMS, NORM_FFN, NORM_POST_FFW,
                      attention_layer, residual_add)
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
                kind, gate_types, up_types, pz, pred_offsets, pred_abs, sel_thresholds, gate_buf, gate_off,
                up_buf, up_off, down_norms, pa_buf, pa_off, pb_buf, pb_off, pbias, ptmp, u8s, u16s, hg, hu, active,
                gvals, win_rows, ovf_pos, out, partial, hsum, stage, stage_map,
                windows, capacities, types, offs, thresholds, il0, pos, t, tset, ptsets):
    """The layers il0.. of a decode step in one call, for as long as a layer has nothing to read: each is
    layer_select, the window's update and layer_ffn with nothing between them. A layer whose chosen
    rows are all in its window (no overflow, no miss) updates the window by "each row active at t",
    which is the whole update when nothing can be evicted (the caller's windows keep rows while they
    have room: window.KEEP_WHILE_ROOM). Returns (il, n, known, nw, no, total): il = n_layer when every
    layer ran; else layer il has rows to read, its attention and selection done (n, known, nw, no as
    layer_select returns them), and the caller runs its FFN (FFNLoader.run_layer) and calls again from
    il + 1. total: the rows computed by the layers that ran.
    windows (n_layer,) tuple: each layer's (window slots, neuron_slot, last_active, column-down tables).
    The selector's resident arrays come as flat buffers with offsets (selector.held_selector_args: its
    gates and ups (n_ff, bytes a row) each, down norms (n_layer, n_ff), predictor factors A (n_embd,
    rank) and B (rank, n_ff) each, bias (n_layer, n_ff), scratch; the (1, 1) stand-ins u8s, u16s where
    a layer's range is empty; each array's columns are its range's size over its rows), not as tuples
    of n_layer arrays: a tuple indexed at run time is a switch over its elements, and seven more of them
    made LLVM's work on this function 4.3 -> 10.9 s. Per layer
    (arrays of n_layer): gate_types, up_types (int64), pred_offsets (f64), pred_abs (bool),
    sel_thresholds (f64); capacities (int64) the windows' slots, -1 where the window holds every row
    and the selector takes them all (bundle rows, dense mode: no split, no miss to look for); types
    (n_layer, 3), offs (n_layer, 4) int64; thresholds (f32) the FFN kernels' gate rule.
    The rest as layer_select and layer_ffn take them. The same calls in the same order as the per-layer
    path: the logits are bitwise the same. The constants it passes are typed as the per-layer path's
    arguments (np.int64(0), not 0): a literal argument compiles a callee again for its value (each of
    layer_select, layer_ffn and sparse_ffn_range twice, ~7 s of a flash file's first-run compile)."""
    total = 0
    n_layer = ip[IP_N_LAYER]
    for il in range(il0, n_layer):
        slots, ns, la, dtab = windows[il]
        gates = _rows_of(gate_buf, gate_off, il, ip[IP_N_FF], u8s)
        ups = _rows_of(up_buf, up_off, il, ip[IP_N_FF], u8s)
        r = (pa_off[il + 1] - pa_off[il]) // ip[IP_N_EMBD]    # the predictor's rank (0: none)
        pa = _rows_of(pa_buf, pa_off, il, ip[IP_N_EMBD], u16s)
        pb = _rows_of(pb_buf, pb_off, il, r, u16s)
        cap = capacities[il]
        n, known, nw, no = layer_select(x, xb, q, k, v, att, scores, k_cache, v_cache, cos, sin, xq_embd, xq_q,
                                        blob, mats, norms, qk_norms, biases, swa, ip, fp, il,
                                        kind, gates, gate_types[il], ups, up_types[il], down_norms[il], pa, pb,
                                        pbias[il], pz, ptmp[:r], pred_offsets[il], pred_abs[il], sel_thresholds[il],
                                        hg, hu, active, gvals, ns, win_rows, ovf_pos, pos, cap, tset, ptsets)
        if cap >= 0 and (no > 0 or _misses(win_rows, nw, ns)):
            return il, n, known, nw, no, total
        for j in range(n):
            la[active[j]] = t
        layer_ffn(x, out, partial, hsum, np.bool_(True), slots, ns, stage, stage_map, active, n, np.int64(0),
                  gvals, known, xb, xq_embd, types[il], offs[il], dtab, ip[IP_ACT], thresholds[il],
                  norms[il, NORM_POST_FFW], fp[FP_EPS], ip[IP_POST_NORMS], ptsets)
        total += n
    return n_layer, 0, 0, 0, 0, total


@njit(cache=True, inline="always")
def _rows_of(buf, off, il, n_rows, stand_in):
    """Layer il's array of n_rows rows in the flat buffer (offsets off), or stand_in where the layer
    has none there (an empty range)."""
    if off[il + 1] == off[il]:
        return stand_in
    return buf[off[il]:off[il + 1]].reshape((n_rows, (off[il + 1] - off[il]) // n_rows))


@njit(cache=True)
def _misses(rows, n, neuron_slot):
    """Whether any of rows[:n] is not in the window (neuron_slot -1)."""
    for j in range(n):
        if neuron_slot[rows[j]] < 0:
            return True
    return False
