"""The FFN loader: the window is a cache, overflow is streamed (LLM in a flash 3.3, made cap-proof).

Per layer and token, the chosen neurons (rows, stored hot-first) are split in two:
- those the window holds, plus as many missing ones as it has room for (the hottest first: the lowest
  row ids), go through `Window.update` (reads only the missing bundles) and are computed over the slots;
- the rest are read into a fixed staging buffer, `staging_rows` at a time, and computed there; the
  partial FFN sums add up.
So every chosen neuron is computed at any cap: the cap changes what is read, never the result.
With gate rows resident a slot holds only up|down of a bundle (one contiguous range per row; the store
reads with a stride), a third less than the whole bundle; with gate and up rows resident (the product
selector) only down.
"""

from __future__ import annotations

import time

import numpy as np
from ..anon import huge_map
from ..kernels import flashstep, sparse
from ..kernels.quant_cols import COLS_BLOCK, COLS_TYPES
from ..kernels.flashstep import split_rows as _split   # (run_chunk; decoding splits in layer_select)
from ..model import lazy_zeros, line_zeros, thread_rows
from .stats import add_read
from .window import Window


NO_TABLES = (np.zeros((1, 1), np.uint16), np.zeros((1, 1), np.uint16), np.zeros(1, np.int32))


def down_tables(l) -> tuple:
    """A layer's column-down tables as the kernels take them (dispatch.axpy_down): (scale, min
    (n_ff / 32, n_embd) uint16 (float16 bits), block (n_ff,) int32 of each stored row), copied into RAM;
    1-row stand-ins of the same types when its down parts are a ggml type (format.LayerInfo.down_scale
    is None) or have no min."""
    if l.down_scale is None:
        return NO_TABLES
    scale = np.array(l.down_scale, np.float16).view(np.uint16)
    dmin = np.array(l.down_min, np.float16).view(np.uint16) if l.down_min is not None else NO_TABLES[1]
    return scale, dmin, (np.asarray(l.neuron_id) // COLS_BLOCK).astype(np.int32)


def pair_cut(active, n: int, ovf_pos, k0: int, m: int, no: int, block) -> tuple[int, int]:
    """(m', j1) for the overflow chunk ovf_pos[k0:k0 + m] of active[:n] (no overflow positions in all):
    the rows to stage, m' <= m, and the end of the positions the call then computes, so that it never
    ends between the two rows of a pair (sparse._pair_at; block: the layer's block of each stored row,
    None without column down parts): the chunk gives its last row to the next one when that row's
    pair is the next chunk's first, and the call takes a pair's second row along when the window holds
    it. The last chunk's call runs to n."""
    while True:
        if k0 + m >= no:
            return m, n
        last = int(ovf_pos[k0 + m - 1])
        if block is None or not sparse._pair_at(active, last, block):
            return m, last + 1
        if int(ovf_pos[k0 + m]) != last + 1:
            return m, last + 2              # the second row is in the window
        if m == 1:
            return m, last + 1              # a one-row staging buffer splits the pair (the plan gives 2+)
        m -= 1


class FFNLoader:
    """Window slots and overflow staging for every layer; `run` computes one layer's sparse FFN."""

    def __init__(self, store, layers, plan, n_ff: int, n_embd: int, n_part: int, window_k: int, tset, ptsets,
                 huge: bool = False):
        """huge: the windows' first slots in one map on transparent huge pages (anon.huge_map), for a
        model with no cap, whose windows fill with every row they can hold and whose RSS is not
        planned; under a cap each window has a map of 4 KiB pages (a huge page is resident whole)."""
        self.tset = tset                                          # the bundle parts' (runtime.chunk_tset)
        self.ptsets = ptsets                                      # the parts' (dispatch.part_type_sets)
        self.store, self.layers, self.n_ff = store, layers, n_ff
        # the bundle parts a slot leaves out: gate (gate rows resident), gate and up (product selector)
        self.n_resident_parts = {"gate": 1, "product": 2}.get(plan.selector, 0)
        self.slot_bytes = plan.slot_bytes                         # per layer
        L = len(layers)
        starts = np.cumsum([0] + [-(-c * b // 64) * 64 for c, b in zip(plan.capacities, plan.slot_bytes)])
        arena, at = huge_map(int(starts[-1])) if huge else (None, 0)   # each window's slots from a line
        self.windows = [Window(n_ff, plan.slot_bytes[il], plan.capacities[il], window_k,
                               None if arena is None else (arena, at + int(starts[il])))
                        if plan.capacities[il] > 0 else None for il in range(L)]
        rows = max(plan.staging_rows, 1)
        self.staging = lazy_zeros((rows, max(plan.slot_bytes)), np.uint8)     # (staging_rows, slot_bytes) uint8
        self.stage_idx = np.arange(rows, dtype=np.int32)          # (staging_rows,) int32
        self.stage_map = np.full(n_ff, -1, np.int32)              # (n_ff,) int32 row -> staging slot
        self.win_rows = np.zeros(n_ff, np.int32)                  # (n_ff,) int32 rows kept in the window
        self.ovf_pos = np.zeros(n_ff, np.int32)                   # (n_ff,) int32 positions of the rest
        self.ovf_rows = np.zeros(n_ff, np.int32)                  # (n_ff,) int32 their rows, one chunk
        self.no_slot = np.full(n_ff, -1, np.int32)                # (n_ff,) int32 "not in a window"
        # (n_part, >= n_embd) the threads' sums, [:, :n_embd] in use, a gap between them (model.thread_rows)
        self.partial = thread_rows(max(2, n_part), n_embd)
        self.out = line_zeros(n_embd)                             # (n_embd,) the FFN's output (run_layer)
        # (n_part, >= n_ff / 32) each thread's h per source block (COLS_U4 down parts), a row per thread on
        # cache lines of its own: with SmolLM2's 48 blocks sharing a line, the bundle FFN ran 1.3x slower
        # on 2 threads (sparse.sparse_ffn_range's hsum); the columns past n_ff / 32 stay 0
        self.hsum = thread_rows(max(2, n_part), max(1, n_ff // COLS_BLOCK))
        # per layer: where a slot's bytes start in the bundle, the part types (n_layer, 3) and the
        # slot-relative offsets (n_layer, 4) int64 (a row per layer for the per-layer calls, the whole
        # arrays for flashstep.layers_held)
        self.read_offset, types, offs = [], [], []
        for l in layers:
            g, u, d = l.part_bytes
            held = [g, u, d]
            for k in range(self.n_resident_parts):   # parts not in a slot are empty ranges at its start
                held[k] = 0
            self.read_offset.append(l.bundle_offset + sum(l.part_bytes[:self.n_resident_parts]))
            types.append(l.types)
            offs.append(np.cumsum([0] + held))
        self.types, self.offs = np.array(types, np.int64), np.array(offs, np.int64)
        self.dtabs = tuple(down_tables(l) for l in layers)   # per layer (dispatch.axpy_down), resident

    def _select_layer(self, il, n_rows):
        l = self.layers[il]
        self.store.select(self.read_offset[il], self.slot_bytes[il], n_rows, stride=l.bundle_bytes)

    def _staging_for(self, il):
        sb = self.slot_bytes[il]
        if sb == self.staging.shape[1]:
            return self.staging
        return self.staging.reshape(-1)[:self.staging.shape[0] * sb].reshape(self.staging.shape[0], sb)

    def load_all(self, il):
        """Fill the window of layer il with every neuron (dense mode)."""
        rows = np.arange(self.n_ff, dtype=np.int32)
        missing, slots = self.windows[il].update(rows, 0)
        self._select_layer(il, self.n_ff)
        self.store.read_rows(missing, self.windows[il].slots, slots)

    def _hold(self, il, nw, t, ts, staging):
        """The window of layer il takes win_rows[:nw] (reading the ones it lacks). Returns (slots,
        neuron_slot map); with no window (naive): the staging buffer and the map "not in a window"."""
        win = self.windows[il]
        if win is None:
            return staging, self.no_slot
        t0 = time.perf_counter()
        missing, slots = win.update(self.win_rows[:nw], t, check=False)
        ts.mm_ms += (time.perf_counter() - t0) * 1e3
        if len(missing):
            self._select_layer(il, self.n_ff)
            add_read(ts, self.store.read_rows(missing, win.slots, slots), len(missing))
        return win.slots, win.neuron_slot

    def run_layer(self, x, il, active, gvals, n, known, nw, no, xb, xq, act, threshold, post, t, ts):
        """The FFN of layer il and its residual (x += ...) over rows active[:n], after
        flashstep.layer_select chose them and split them: win_rows[:nw] for the window, the positions
        ovf_pos[:no] for the staging buffer. Reads what the window lacks, then the overflow in chunks of
        the staging buffer (positions in order, so the sum is the same at every cap). post: (post_w,
        eps, post_norm) of the residual. Adds to ts: loaded, overflow, bytes, reads, io ms, mm ms."""
        types, offs = self.types[il], self.offs[il]
        staging = self._staging_for(il)
        wslots, wmap = self._hold(il, nw, t, ts, staging)
        j0 = 0
        if no:
            self._select_layer(il, self.n_ff)
            self.partial[:] = 0.0
            self.hsum[:] = 0.0
            step = staging.shape[0]
            block = self.dtabs[il][2] if types[2] in COLS_TYPES else None   # pairs (sparse._pair_at)
            k0 = 0
            while k0 < no:
                m, j1 = pair_cut(active, n, self.ovf_pos, k0, min(step, no - k0), no, block)
                chunk = self.ovf_rows[:m]
                np.take(active, self.ovf_pos[k0:k0 + m], out=chunk)
                self.stage_map[chunk] = self.stage_idx[:m]
                add_read(ts, self.store.read_rows(chunk, staging, self.stage_idx[:m]), m)
                sparse.sparse_ffn_range(self.partial, self.hsum, wslots, wmap, staging, self.stage_map, active, n,
                                        j0, j1, gvals, known, xb, xq, types, offs, self.dtabs[il], act, threshold,
                                        self.ptsets)
                j0 = j1
                k0 += m
            ts.overflow += no
        flashstep.layer_ffn(x, self.out, self.partial, self.hsum, no == 0, wslots, wmap, staging, self.stage_map,
                            active, n, j0, gvals, known, xb, xq, types, offs, self.dtabs[il], act, threshold, *post,
                            self.ptsets)

    def run_chunk(self, OUT, il, union, n, MK, HG, known, XB, XR, act, threshold, t, ts, buf):
        """OUT[j] (T, n_embd) = the FFN of layer il for prompt token j over the rows it chose (MK[j]),
        reading the chunk's union of rows (union[:n], increasing) once: the window takes what it can,
        the rest goes through the staging buffer in parts of ascending rows, and each part is computed
        for the whole chunk (sparse.sparse_ffn_chunk) while it is held. buf: the ChunkPrefill's
        accumulators PART (n_part, T, n_embd) and scratch DEC, H."""
        T = XB.shape[0]
        types, offs = self.types[il], self.offs[il]
        staging = self._staging_for(il)
        win = self.windows[il]
        nw, no = _split(self.win_rows, self.ovf_pos, union, n, win.neuron_slot if win else self.no_slot,
                        win.capacity if win else 0)
        wslots, wmap = self._hold(il, nw, t, ts, staging)
        self._select_layer(il, self.n_ff)
        rows = self.ovf_rows[:no]
        np.take(union, self.ovf_pos[:no], out=rows)
        PART = buf.PART                                   # (n_part, chunk, n_embd): rows [:T] in use
        PART[:, :T] = 0.0
        step = staging.shape[0]
        p0 = 0
        for k0 in range(0, max(no, 1), step):
            m = min(step, no - k0)
            if m > 0:
                part = rows[k0:k0 + m]
                self.stage_map[part] = self.stage_idx[:m]
                add_read(ts, self.store.read_rows(part, staging, self.stage_idx[:m]), m)
            # union positions whose rows are held now: every row below the next part's first row
            p1 = int(self.ovf_pos[k0 + m]) if k0 + m < no else n
            if p1 > p0:
                sparse.sparse_ffn_chunk(PART, buf.DEC, buf.H, wslots, wmap, staging, self.stage_map, union, p0,
                                        p1, MK, HG, known, XB, XR, types, offs, self.dtabs[il], act, threshold,
                                        self.tset, self.ptsets[3])
            p0 = p1
        sparse.sum_parts_chunk(OUT, PART)
        ts.overflow += no

    def shrink(self, factor: float) -> None:
        for win in self.windows:
            if win is not None:
                win.shrink(max(1, int(win.capacity * factor)))
