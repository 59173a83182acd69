"""Sparse FFN kernels over neuron bundles (LLM in a flash, 3.1-3.3).

A bundle row is gate_i | up_i | down_i (down_i: column i of W_down, re-quantized as a row of n_embd).
The window keeps bundles in slots (capacity, bundle_bytes) uint8; `neuron_slot` maps a stored row to
its slot. Identity (tests/test_flash_runtime.py): every neuron selected = the dense FFN.
"""

import numpy as np
from numba import njit, prange

from .dispatch import axpy_down, axpy_down_pair, dequant_down, dequant_into, dot_row, uses_q8x
from .quant_cols import COLS_I8, COLS_U4
from .nn import FASTMATH, activate, gate_rule, product_rule
from .quant_basic import MM_ROWS, _gemm_rows, _u16_as_f16_to_f32, prefetch, prefetch_ahead

# what the selector computed for each chosen row (sparse_ffn_range, sparse_ffn_chunk)
KNOWN_NONE = 0   # nothing: gate and up come from the bundle
KNOWN_GATE = 1   # its activated gate value act(gate) (resident gate rows)
KNOWN_H = 2      # its value act(gate) * up (resident gate and up rows: the product selector)
# sparse_ffn_range asks for the rows this many positions ahead, each part in the loop that uses it: the
# gate loop for the gate parts, the up loop for the up parts, the down loop for the down parts. Asking
# for a whole row in the first loop put 8 rows' 128 lines in flight at once and then none while the
# up dots and down parts ran (SmolLM2 bundle rows, 2 threads, inside the decode loop, tokens
# alternating in one process: the FFN 3.75-3.78 -> 3.47-3.56 ms a token; /tmp harness, closing note 23)
PREFETCH_AHEAD = 8
# sparse_ffn_range computes the h of this many rows, then adds their down parts: each row's axpy waited
# for its own dot (dot, horizontal sum, then 576 dependent stores), and the next row's dot could not
# start under it; in groups the dots overlap (tools/bench_sparse.py, SmolLM2 gate rows, one thread, in
# cache: 107-113 -> 82-86 ns a row)
H_GROUP = 8


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def matvec_rows(out, w, qt, x, xq, tset):
    """out (n_rows,) = W @ x for a weight held outside the file map (e.g. resident gate rows)."""
    for r in prange(w.shape[0]):
        prefetch_ahead(w, r)
        out[r] = dot_row(qt, w[r], x, xq, tset)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def select_by_gate(active, gvals, hg, act, threshold):
    """Exact selection (gate-resident mode): rows with |act(hg[i])| > threshold.
    active (n_ff,) int32 and gvals (n_ff,) f32 receive the rows (increasing) and their activated gate
    values act(hg[i]) (computed here once: the activation is ~a third of a row's work in the FFN);
    hg becomes act(hg). The activations first, in a loop of their own that LLVM vectorizes, then the
    rows that pass: 6.4 -> 2.3 us for 1536 rows. Returns how many."""
    for i in range(hg.shape[0]):
        hg[i] = activate(hg[i], act)
    n = 0
    for i in range(hg.shape[0]):
        v = hg[i]
        if abs(v) > threshold:
            active[n] = i
            gvals[n] = v
            n += 1
    return n


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def select_by_product(active, hvals, hg, hu, scale, act, threshold):
    """Product selection (gate and up rows resident): rows with |h_i| * scale[i] > threshold, where
    h_i = act(hg[i]) * hu[i] and scale (n_ff,) f32 = the norms of the rows' down parts. active (n_ff,)
    int32 and hvals (n_ff,) f32 receive the rows (increasing) and their h; hg becomes h. The h first, in
    a loop LLVM vectorizes, then the rows that pass (as select_by_gate). Returns how many."""
    for i in range(hg.shape[0]):
        hg[i] = activate(hg[i], act) * hu[i]
    n = 0
    for i in range(hg.shape[0]):
        h = hg[i]
        if abs(h) * scale[i] > threshold:
            active[n] = i
            hvals[n] = h
            n += 1
    return n


@njit(cache=True, fastmath=FASTMATH)
def select_by_logit(active, z, offset, absolute):
    """Predicted selection: rows whose logit (|z| - offset, or z) is > 0. Returns how many."""
    n = 0
    for i in range(z.shape[0]):
        logit = abs(z[i]) - offset if absolute else z[i]
        if logit > 0.0:
            active[n] = i
            n += 1
    return n


@njit(cache=True, fastmath=FASTMATH)
def predictor_logits(z, tmp, x, a, b, bias):
    """z (n_ff,) = (x @ A) @ B + bias; tmp (r,) f32 scratch; A (n_embd, r) and B (r, n_ff) uint16 holding
    the file's float16 bits (resident as stored: half the RAM of float32), summed in float32."""
    r = a.shape[1]
    for k in range(r):
        tmp[k] = 0.0
    for i in range(x.shape[0]):
        xi = x[i]
        for k in range(r):
            tmp[k] += xi * _u16_as_f16_to_f32(a[i, k])
    for j in range(z.shape[0]):
        z[j] = bias[j]
    for k in range(r):
        t = tmp[k]
        for j in range(z.shape[0]):
            z[j] += t * _u16_as_f16_to_f32(b[k, j])


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def sparse_ffn_range(partial, hsum, slots, neuron_slot, stage, stage_map, active, n, j0, j1, gvals, known,
                     x, xq, types, offs, dtab, act, threshold, ptsets):
    """partial[c] += the FFN contributions of positions j0 <= j < j1 of `active` (of n chosen rows) that
    fall in part c: the n positions are cut into n_part contiguous blocks, c n / n_part <= j <
    (c + 1) n / n_part.

    A row lives in a window slot (neuron_slot[row] >= 0: slots[neuron_slot[row]]) or in the staging
    buffer (stage[stage_map[row]]). Part c always adds its rows in increasing j, however the positions
    are cut into calls, so the sum (sum_partials) is bitwise the same whether every row sat in the window
    or most were streamed through staging in chunks: the cap never changes the logits. Column down parts
    add a pair (stored rows 2p, 2p + 1 of one source block at positions j, j + 1 of one part: _pair_at)
    in one pass (dispatch.axpy_down_pair); the caller never cuts the positions between the two
    (pair_cut), so that holds for them too. Contiguous
    blocks, not every n_part-th position: rows are stored hot-first and mostly sit in ascending slots,
    so each thread walks its rows in address order (every other row defeated the hardware prefetcher:
    2.5x slower per row than the dense matvec once the layers no longer fit in cache).
    known (int): what gvals[j] (>= j1,) f32 holds by position on entry: KNOWN_NONE nothing (gate and up
    come from the row, |act(gate)| > threshold decides), KNOWN_GATE the activated gate values (up from
    the row, same rule), KNOWN_H the neuron's value act(gate) * up itself (the product selector chose
    the rows: only the down part is used). On return gvals[j0:j1] holds each row's h (0: not added).
    partial (n_part, >= n_embd) f32, row c's first n_embd (= len(x)) part c's sum (model.thread_rows),
    zeroed by the caller before the first range; slots/stage (rows,
    slot_bytes) uint8; neuron_slot/stage_map (n_ff,) int32; active (>= j1,) int32; types (3,) int64;
    offs (4,) int64 byte offsets of gate, up, down inside a slot (empty parts when the slot holds only
    up|down, or only down); dtab the layer's column-down tables (dispatch.axpy_down; 1-row stand-ins
    when its down parts are a ggml type) and hsum (n_part, >= n_ff / 32) f32, zeroed with partial: part c's
    h summed per source block for COLS_U4 down parts, whose mins the caller adds once
    (quant_cols.add_block_mins); ptsets the parts' (gate, up, down) type sets (dispatch.part_type_sets)."""
    n_part = partial.shape[0]
    t_gate, t_up, t_down = types[0], types[1], types[2]
    o_gate, o_up, o_down, o_end = offs[0], offs[1], offs[2], offs[3]
    pairs = t_down == COLS_U4 or t_down == COLS_I8   # column down parts: pairs of one source block
    for c in prange(n_part):
        acc = partial[c][:x.shape[0]]
        b1 = min(j1, (c + 1) * n // n_part)
        d = max(j0, c * n // n_part)      # the next position whose down part is still to add
        for g0 in range(d, b1, H_GROUP):
            g1 = min(b1, g0 + H_GROUP)
            if known != KNOWN_H:   # the group's h first: independent dots, then the axpys
                if known == KNOWN_NONE:   # the gate dots of the group, one after another (they overlap)
                    for j in range(g0, g1):
                        if j + PREFETCH_AHEAD < b1:
                            _prefetch_row(slots, neuron_slot, stage, stage_map, active[j + PREFETCH_AHEAD], o_gate,
                                          o_up)
                        a = active[j]
                        gvals[j] = dot_row(t_gate, _row(slots, stage, neuron_slot[a], stage_map[a])[o_gate:o_up],
                                           x, xq, ptsets[0])
                    for j in range(g0, g1):
                        gvals[j] = activate(gvals[j], act)
                for j in range(g0, g1):
                    if j + PREFETCH_AHEAD < b1:
                        _prefetch_row(slots, neuron_slot, stage, stage_map, active[j + PREFETCH_AHEAD], o_up, o_down)
                    a = active[j]
                    v = gvals[j]
                    h = np.float32(0.0)
                    if abs(v) > threshold:
                        h = v * dot_row(t_up, _row(slots, stage, neuron_slot[a], stage_map[a])[o_up:o_down], x, xq,
                                        ptsets[1])
                    gvals[j] = h
            # the down parts of positions d..g1-1, but for the first row of a pair at g1 - 1, whose second
            # row's h the next group computes
            e = g1 - 1 if pairs and g1 < b1 and _pair_at(active, g1 - 1, dtab[2]) else g1
            j = d
            while j < e:
                if j + PREFETCH_AHEAD < b1:
                    _prefetch_row(slots, neuron_slot, stage, stage_map, active[j + PREFETCH_AHEAD], o_down, o_end)
                a = active[j]
                h = gvals[j]
                # a pair with both h nonzero in one pass; one with a zero h as two single rows (one inlined
                # copy of the single row's kernels: a third cost ~2 s of a first run's compile)
                if pairs and j + 1 < b1 and _pair_at(active, j, dtab[2]) and h != 0.0 and gvals[j + 1] != 0.0:
                    if j + 1 + PREFETCH_AHEAD < b1:
                        _prefetch_row(slots, neuron_slot, stage, stage_map, active[j + 1 + PREFETCH_AHEAD], o_down,
                                      o_end)
                    h1 = gvals[j + 1]
                    axpy_down_pair(t_down, acc, h, _row(slots, stage, neuron_slot[a], stage_map[a])[o_down:o_end],
                                   h1, _row(slots, stage, neuron_slot[a + 1], stage_map[a + 1])[o_down:o_end], dtab,
                                   a, ptsets[3])
                    if t_down == COLS_U4:
                        hsum[c, dtab[2][a]] += h
                        hsum[c, dtab[2][a]] += h1
                    j += 2
                    continue
                if h != 0.0:
                    axpy_down(t_down, acc, h, _row(slots, stage, neuron_slot[a], stage_map[a])[o_down:o_end],
                              dtab, a, ptsets[2], ptsets[3])
                    if t_down == COLS_U4:
                        hsum[c, dtab[2][a]] += h
                j += 1
            d = j


@njit(cache=True, inline="always")
def _pair_at(active, j, block):
    """Whether positions j and j + 1 of active hold a pair: stored rows 2p and 2p + 1 of one source
    block (block (n_ff,) int32, each stored row's; the converter stores column parts so)."""
    a = active[j]
    return a % 2 == 0 and active[j + 1] == a + 1 and block[a] == block[a + 1]


@njit(cache=True, inline="always")
def _row(slots, stage, s, sm):
    """The row in window slot s (s >= 0), else staging row sm."""
    return slots[s] if s >= 0 else stage[sm]


@njit(cache=True, inline="always")
def _prefetch_row(slots, neuron_slot, stage, stage_map, a, o0, o1):
    """Ask for bytes o0..o1 of row a's slot (window or staging)."""
    row = _row(slots, stage, neuron_slot[a], stage_map[a])
    for o in range(o0, o1, 64):
        prefetch(row, o)


@njit(cache=True)
def sum_partials(out, partial):
    """out (n_embd,) = sum over c of partial[c, :n_embd], in c order."""
    for i in range(out.shape[0]):
        s = np.float32(0.0)
        for c in range(partial.shape[0]):
            s += partial[c, i]
        out[i] = s


# ---- a prompt chunk: each bundle decoded once, its dot products over the chunk as a matrix product ----

@njit(cache=True, fastmath=FASTMATH, parallel=True)
def gate_chunk(HG, gates, qt, X, tset):
    """HG (T, n_ff) = X (T, n_embd) @ gates.T for resident gate rows gates (n_ff, row_bytes) uint8 of
    type qt: rows decoded MM_ROWS at a time, then the register-blocked product (what dispatch.matmat
    does, without loading a second copy of every type's matmat under the cap)."""
    n_ff = gates.shape[0]
    n_groups = (n_ff + MM_ROWS - 1) // MM_ROWS
    for g in prange(n_groups):
        r0 = g * MM_ROWS
        nr = min(MM_ROWS, n_ff - r0)
        buf = np.empty((MM_ROWS, X.shape[1]), np.float32)   # decoded rows of this group
        for r in range(nr):
            dequant_into(qt, buf[r], gates[r0 + r], tset)
        _gemm_rows(HG, buf, X, r0, nr)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def mask_by_gate(MK, HG, act, threshold, scratch):
    """MK[j, i] = 1 where |act(HG[j, i])| > threshold (token j chooses row i); a negative threshold -k
    is the per-token top-k rule (nn.topk_threshold: each token its own k largest), the tokens then taken
    one after another through scratch (n_ff,) f32 (overwritten; ~10 us a token). MK (T, n_ff) uint8,
    HG (T, n_ff) f32 gate values."""
    if threshold < 0.0:
        for j in range(HG.shape[0]):
            _mask_gate_row(MK[j], HG[j], act, gate_rule(threshold, HG[j], act, scratch))
        return
    for j in prange(HG.shape[0]):
        _mask_gate_row(MK[j], HG[j], act, threshold)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _mask_gate_row(mk, hg, act, t):
    """mk[i] = 1 where |act(hg[i])| > t: one token's row of mask_by_gate."""
    for i in range(hg.shape[0]):
        mk[i] = 1 if abs(activate(hg[i], act)) > t else 0


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def mask_by_product(MK, HG, HU, scale, act, threshold, scratch):
    """A chunk's product selection (select_by_product's rule): HG[j, i] becomes h = act(HG[j, i]) *
    HU[j, i], and MK[j, i] = 1 where |h| * scale[i] > threshold. MK (T, n_ff) uint8; HG, HU (T, n_ff) f32.
    A negative threshold -k is the per-token top-k rule (nn.product_topk_threshold), the tokens then
    taken one after another through scratch (n_ff,) f32."""
    if threshold < 0.0:
        for j in range(HG.shape[0]):
            _mask_product_row(MK[j], HG[j], HU[j], scale, act,
                              product_rule(threshold, HG[j], HU[j], scale, act, scratch))
        return
    for j in prange(HG.shape[0]):
        _mask_product_row(MK[j], HG[j], HU[j], scale, act, threshold)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _mask_product_row(mk, hg, hu, scale, act, t):
    """hg[i] becomes h = act(hg[i]) hu[i], mk[i] = 1 where |h| scale[i] > t: one token's row of
    mask_by_product."""
    for i in range(hg.shape[0]):
        h = activate(hg[i], act) * hu[i]
        hg[i] = h
        mk[i] = 1 if abs(h) * scale[i] > t else 0


@njit(cache=True, fastmath=FASTMATH)
def mask_by_logit(mk, z, offset, absolute):
    """mk (n_ff,) uint8 = 1 where the predictor's logit (|z| - offset, or z) is > 0 (select_by_logit's rule)."""
    for i in range(z.shape[0]):
        logit = abs(z[i]) - offset if absolute else z[i]
        mk[i] = 1 if logit > 0.0 else 0


@njit(cache=True)
def union_rows(union, MK):
    """union[:n] = the rows some token of the chunk chose (increasing); returns n. MK (T, n_ff) uint8."""
    n = 0
    for i in range(MK.shape[1]):
        for j in range(MK.shape[0]):
            if MK[j, i]:
                union[n] = i
                n += 1
                break
    return n


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
def sparse_ffn_chunk(PART, DEC, H, slots, neuron_slot, stage, stage_map, union, u0, u1, MK, HG, known,
                     XB, XR, types, offs, dtab, act, threshold, tset, cols):
    """PART[c, j] += the FFN contributions, for token j, of the rows a = union[p], u0 <= p < u1,
    a % n_part == c, that token j chose (MK[j, a]) and whose |act(gate)| > threshold.

    Each row is decoded once for the whole chunk (gate, up, down parts into DEC) and its gate/up dot
    products with every token's input come from a register-blocked matrix product (the dense engine's
    _gemm_rows); token j then adds h_j * down_row for the rows it chose, in increasing row id per part
    (parts by row id, not by position in the union), however the union is cut into calls and whatever
    else the chunk's tokens chose: the sum is the same at every cap and chunk size. known (as in
    sparse_ffn_range): KNOWN_GATE, the gate values are HG[j, row] (the chunk's resident gate rows);
    KNOWN_H, HG[j, row] is the neuron's value itself (only down is decoded); KNOWN_NONE, from the bundle.
    PART (n_part, T, n_embd) f32, zeroed by the caller; DEC (n_part, 3, MM_ROWS, n_embd) f32 and
    H (n_part, 2, T, MM_ROWS) f32 scratch; slots/stage (rows, slot_bytes) uint8; neuron_slot/stage_map
    (n_ff,) int32; union (>= u1,) int32; MK (T, n_ff) uint8; HG (T, n_ff) f32; XB (T, n_embd) f32 the
    FFN inputs and XR the same as 8-bit blocks (round_q8), used for the part types whose decode dot reads
    those (so the chunk computes what token-by-token decoding does, up to float rounding). dtab, cols:
    the down part's tables and column kinds (dispatch.dequant_down)."""
    n_part = PART.shape[0]
    T = XB.shape[0]
    xg = XR if uses_q8x(types[0]) else XB
    xu = XR if uses_q8x(types[1]) else XB
    for c in prange(n_part):
        acc = PART[c]
        gb, ub, db = DEC[c, 0], DEC[c, 1], DEC[c, 2]
        hgl, hul = H[c, 0], H[c, 1]
        rows = np.empty(MM_ROWS, np.int32)    # this part's rows of the group being decoded
        hs = np.empty(MM_ROWS, np.float32)    # one token's h for those rows
        p = u0
        while p < u1:
            nr = 0
            while p < u1 and nr < MM_ROWS:
                if union[p] % n_part == c:
                    rows[nr] = union[p]
                    nr += 1
                p += 1
            if nr == 0:
                break
            for r in range(nr):
                a = rows[r]
                row = _row(slots, stage, neuron_slot[a], stage_map[a])
                if known == KNOWN_NONE:
                    dequant_into(types[0], gb[r], row[offs[0]:offs[1]], tset)
                if known != KNOWN_H:
                    dequant_into(types[1], ub[r], row[offs[1]:offs[2]], tset)
                dequant_down(types[2], db[r], row[offs[2]:offs[3]], dtab, a, tset, cols)
            # whole blocks of 4 rows (zero rows pad the last): _gemm_rows computes each row of a block
            # by the same code, so a row's dot products do not depend on its neighbours
            nr4 = (nr + 3) // 4 * 4
            for r in range(nr, nr4):
                gb[r, :] = 0.0
                ub[r, :] = 0.0
            r0 = np.int64(0)   # not a literal 0: a literal compiles _gemm_rows once more for its value
            if known == KNOWN_NONE:
                _gemm_rows(hgl, gb, xg, r0, nr4)
            if known != KNOWN_H:
                _gemm_rows(hul, ub, xu, r0, nr4)
            for j in range(T):
                out = acc[j]
                for r in range(nr):     # token j's h for each row of the group, 0 where it adds nothing
                    a = rows[r]
                    h = np.float32(0.0)
                    if MK[j, a]:
                        if known == KNOWN_H:
                            h = HG[j, a]
                        else:
                            v = activate(HG[j, a] if known == KNOWN_GATE else hgl[j, r], act)
                            if abs(v) > threshold:
                                h = v * hul[j, r]
                    hs[r] = h
                r = 0
                while r + 4 <= nr:
                    if hs[r] != 0.0 or hs[r + 1] != 0.0 or hs[r + 2] != 0.0 or hs[r + 3] != 0.0:
                        _axpy4(out, hs[r], db[r], hs[r + 1], db[r + 1], hs[r + 2], db[r + 2], hs[r + 3], db[r + 3])
                    r += 4
                while r < nr:
                    if hs[r] != 0.0:
                        _axpy1(out, hs[r], db[r])
                    r += 1


# The down part of a chunk: out += h_r * down_r over a token's rows, four rows per pass over out (one
# load and store of out per four multiply-adds, where a pass per row did one per one). Compiled with
# "contract" only, no reassociation: each element is the chain fma(h3, d3, fma(h2, d2, fma(h1, d1,
# fma(h0, d0, out)))), the same roundings as four one-row passes, so the sum does not depend on how
# the rows fall into groups of four (the cap and the chunk size never change the logits). A row with
# h = 0 adds an exact 0.
@njit(cache=True, fastmath={"contract"})
def _axpy4(out, h0, d0, h1, d1, h2, d2, h3, d3):
    for i in range(out.shape[0]):
        o = out[i]
        o += h0 * d0[i]
        o += h1 * d1[i]
        o += h2 * d2[i]
        o += h3 * d3[i]
        out[i] = o


@njit(cache=True, fastmath={"contract"})
def _axpy1(out, h, d):
    for i in range(out.shape[0]):
        out[i] += h * d[i]


@njit(cache=True, parallel=True)
def sum_parts_chunk(OUT, PART):
    """OUT[j] (n_embd,) = sum over c of PART[c, j], in c order. OUT (T, n_embd); PART (n_part, >= T, n_embd)."""
    for j in prange(OUT.shape[0]):
        for i in range(OUT.shape[1]):
            s = np.float32(0.0)
            for c in range(PART.shape[0]):
                s += PART[c, j, i]
            OUT[j, i] = s
