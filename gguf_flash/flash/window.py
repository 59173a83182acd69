"""The sliding-window slot manager: which FFN neurons of one layer are in DRAM, and where.

LLM in a flash, 3.3 ("Sliding window"): keep the neurons that were active in any of the last k tokens;
each new token loads only the ones it needs that are not already there. The runtime's default k is
KEEP_WHILE_ROOM: nothing ages out, and a token that needs slots takes those of the least recently active
neurons (never one it uses), as a window of k tokens does when it is full. 3.3 ("DRAM management without
allocation"): one preallocated matrix of bundle slots per layer plus index arrays; deleting a neuron
moves the last used slot into its hole, new neurons are appended at the end. No LRU lists, nothing
allocated per token.

The window knows nothing about models: a neuron is a stored row index of the layer's bundle tensor and a
slot is one row of `slots` that the caller fills from disk (flash/store.py) with the rows `update`
returns as missing.
"""

import numpy as np
from numba import njit

from ..anon import anon_map, release
from ..errors import InvalidArgumentError, RamCapError

_NEVER = -(2 ** 30)  # last_active of a neuron never seen; far below any t - k, no int32 overflow
# A window length that never ages a row out: rows leave only when a token needs their slots, the least
# recently active first (the runtime's default, FlashModel(window_k=None)). The paper's k tokens emptied
# slots that then sat unused: with every row fitting (no cap), SmolLM2's product selector read 2.4 ms a
# token again of rows inactive for 8 tokens (tools/bench_step.py: 8.11 -> 6.30 ms a token).
KEEP_WHILE_ROOM = 2 ** 30 - 1
_INT32_MIN = -(2 ** 31)
_INT32_MAX = 2 ** 31 - 1


# ---------------------------------------------------------------------------------------------------
# kernels (output first, then inputs, then sizes)
# ---------------------------------------------------------------------------------------------------

@njit(cache=True)
def _check_active(active, n_ff):
    """0 if active is strictly increasing and inside [0, n_ff), else 1."""
    prev = -1
    for j in range(active.shape[0]):
        a = active[j]
        if a <= prev or a >= n_ff:
            return 1
        prev = a
    return 0


@njit(cache=True)
def _eviction_cutoff(scratch, slot_neuron, last_active, n_used, lo, hi, need):
    """Pick the `need` oldest candidates among used neurons with lo < last_active < hi.

    Order is (last_active, neuron id) ascending, so ties break by id and the result is deterministic.
    Returns (cut_t, cut_id): a neuron n is chosen iff (la[n], n) <= (cut_t, cut_id) and la[n] > lo.
    Repeated min passes over the used slots: one pass per distinct age removed, at most k of them.
    scratch: (capacity,) int32, holds the ids that tie at the final age (sorted in place).
    """
    if need <= 0:
        return lo, -1  # nothing beyond la <= lo
    while True:
        m = hi
        cnt = 0
        for s in range(n_used):
            la = last_active[slot_neuron[s]]
            if la > lo and la < hi:
                if la < m:
                    m = la
                    cnt = 1
                elif la == m:
                    cnt += 1
        if cnt == 0:
            return lo, -1  # fewer candidates than need: the caller checked this cannot happen
        if cnt <= need:
            need -= cnt
            lo = m
            if need == 0:
                return m, _INT32_MAX
            continue
        c = 0
        for s in range(n_used):
            n = slot_neuron[s]
            if last_active[n] == m:
                scratch[c] = n
                c += 1
        part = scratch[:c]
        part.sort()  # in place: numba's quicksort keeps its stack on the C stack
        return m, part[need - 1]


@njit(cache=True)
def _compact(slots, slot_neuron, neuron_slot, last_active, n_used, hi, cut_t, cut_id):
    """Evict every used neuron n with la[n] < hi and (la[n], n) <= (cut_t, cut_id); returns new n_used.

    Each hole is filled by the last used slot (its bytes move with it), after first dropping evictable
    neurons from the end so that no slot is copied only to be evicted again.
    slots: (capacity, bundle_bytes) uint8; slot_neuron: (capacity,) int32; neuron_slot: (n_ff,) int32.
    """
    s = 0
    while s < n_used:
        n = slot_neuron[s]
        la = last_active[n]
        if not (la < hi and (la < cut_t or (la == cut_t and n <= cut_id))):
            s += 1
            continue
        neuron_slot[n] = -1
        # drop evictable neurons sitting in the last slot
        while n_used - 1 > s:
            m = slot_neuron[n_used - 1]
            lm = last_active[m]
            if lm < hi and (lm < cut_t or (lm == cut_t and m <= cut_id)):
                neuron_slot[m] = -1
                n_used -= 1
            else:
                break
        if n_used - 1 > s:
            last = n_used - 1
            m = slot_neuron[last]
            src = slots[last]
            dst = slots[s]
            for b in range(src.shape[0]):  # a plain loop: numba's slice assignment is ~8x slower
                dst[b] = src[b]
            slot_neuron[s] = m
            neuron_slot[m] = s
            n_used -= 1
            s += 1  # the neuron moved in is a keeper
        else:
            n_used -= 1  # s was the last used slot
            break
    return n_used


@njit(cache=True)
def _update(missing_out, slot_out, slots, slot_neuron, neuron_slot, last_active, scratch,
            active, t, k, capacity, n_used):
    """One token of the sliding window; returns (new n_used, n_missing).

    missing_out, slot_out: (capacity,) int32, the rows to read and their slots (sorted rows,
    consecutive slots at the end of the used range). active: (n_active,) int32 strictly increasing.
    The caller checked n_active <= capacity.
    """
    n_active = active.shape[0]
    n_missing = 0
    for j in range(n_active):
        a = active[j]
        last_active[a] = t
        if neuron_slot[a] < 0:
            n_missing += 1
    # neurons kept by the window: active in one of tokens t-k+1 .. t
    lo = t - k
    # t < k (always with KEEP_WHILE_ROOM): no neuron is old enough to leave (each held one was active at
    # some t' >= 0 > lo), so with room for the misses nothing is evicted and the passes below are skipped
    # (3 over the used slots: 8 us a layer, 0.25 ms of SmolLM2's token with 80% of its rows active)
    if lo >= 0 or n_used + n_missing > capacity:
        kept = 0
        for s in range(n_used):
            if last_active[slot_neuron[s]] > lo:
                kept += 1
        need = kept + n_missing - capacity
        # over capacity: also evict the oldest kept neurons, never one needed at t (la == t)
        cut_t, cut_id = _eviction_cutoff(scratch, slot_neuron, last_active, n_used, lo, t, need)
        if cut_t == lo:
            cut_t = lo + 1  # evict exactly la <= lo = t - k
            cut_id = -1
        n_used = _compact(slots, slot_neuron, neuron_slot, last_active, n_used, t, cut_t, cut_id)
    j_out = 0
    for j in range(n_active):
        a = active[j]
        if neuron_slot[a] < 0:
            neuron_slot[a] = n_used
            slot_neuron[n_used] = a
            missing_out[j_out] = a
            slot_out[j_out] = n_used
            j_out += 1
            n_used += 1
    return n_used, n_missing


# ---------------------------------------------------------------------------------------------------
# public class
# ---------------------------------------------------------------------------------------------------

class Window:
    """The neurons of one layer held in DRAM, in preallocated bundle slots.

    Attributes:
        slots:       (capacity, bundle_bytes) uint8, backed by a private anonymous map so that `shrink`
                     returns pages to the OS (RSS drops) without reallocating; its own map, or
                     (storage) a range of one the caller shares between windows
        slot_neuron: (capacity,) int32, stored row index of the neuron in each used slot
        neuron_slot: (n_ff,) int32, slot of each neuron, -1 if absent
        last_active: (n_ff,) int32, last token index at which each neuron was active
        n_used:      slots[:n_used] hold neurons
        k:           window length in tokens; adjustable at any time
    """

    def __init__(self, n_ff: int, bundle_bytes: int, capacity: int, k: int, storage=None):
        """storage: (map, offset) of capacity * bundle_bytes bytes for the first slots (flash/ffn.py: the
        windows on huge pages without a cap); None: a map of the window's own (anon_map)."""
        if n_ff <= 0 or bundle_bytes <= 0 or capacity <= 0 or k < 1:
            raise InvalidArgumentError(
                f"Window needs n_ff, bundle_bytes, capacity > 0 and k >= 1 "
                f"(got {n_ff}, {bundle_bytes}, {capacity}, {k})")
        self.n_ff = int(n_ff)
        self.bundle_bytes = int(bundle_bytes)
        self.k = int(k)
        self.neuron_slot = np.full(self.n_ff, -1, np.int32)          # (n_ff,) int32
        self.last_active = np.full(self.n_ff, _NEVER, np.int32)      # (n_ff,) int32
        self.n_used = 0
        self.capacity = 0
        self._allocated = 0
        self._alloc(int(capacity), storage)

    # -- storage ------------------------------------------------------------------------------------

    def _alloc(self, capacity, storage=None):
        """(Re)allocate every per-slot array for `capacity` slots, keeping the used ones; the slots in
        storage (map, offset) when given, else in a map of their own."""
        n_bytes = max(capacity * self.bundle_bytes, 1)
        if storage is None:
            mm, off = anon_map(n_bytes), 0   # page-aligned, zero pages are not resident until written
        else:
            mm, off = storage
        slots = np.frombuffer(mm, np.uint8, capacity * self.bundle_bytes, offset=off).reshape(
            capacity, self.bundle_bytes)                              # (capacity, bundle_bytes) uint8
        slot_neuron = np.full(capacity, -1, np.int32)                # (capacity,) int32
        if self.n_used:
            slots[:self.n_used] = self.slots[:self.n_used]
            slot_neuron[:self.n_used] = self.slot_neuron[:self.n_used]
        self._mm, self._mm_range = mm, (off, off + n_bytes)           # the map and the slots' bytes in it
        self.slots = slots
        self.slot_neuron = slot_neuron
        self._missing = np.empty(capacity, np.int32)                 # (capacity,) int32 scratch
        self._missing_slot = np.empty(capacity, np.int32)            # (capacity,) int32 scratch
        self._scratch = np.empty(capacity, np.int32)                 # (capacity,) int32 scratch
        self.capacity = capacity
        self._allocated = capacity

    def _release_tail(self):
        """Give the pages of slots beyond `capacity` back to the OS (they read as zeros later)."""
        start = self._mm_range[0] + self.capacity * self.bundle_bytes
        release(self._mm, start, self._mm_range[1] - start)   # whole pages only: never a neighbour's

    # -- per token ----------------------------------------------------------------------------------

    def update(self, active: np.ndarray, t: int, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Make room for the neurons active at token t; return (missing rows, their slots).

        active: (n_active,) int32, strictly increasing row ids needed at token t. Marks them active at
        t, evicts the neurons not active in the last k tokens (t-k+1 .. t), and if still short of room
        the oldest-active kept ones (never one needed at t). The missing rows get consecutive slots at
        the end of the used range; the caller must fill slots[slot] from disk before using them.
        Returns views into preallocated scratch, valid until the next call. check=False: the caller
        (flash/ffn.py) passes rows it chose itself, int32, increasing, at most capacity of them.
        """
        if check:
            active = self._checked(active, t)
        self.n_used, n_missing = _update(
            self._missing, self._missing_slot, self.slots, self.slot_neuron, self.neuron_slot,
            self.last_active, self._scratch, active, int(t), int(self.k), self.capacity, self.n_used)
        return self._missing[:n_missing], self._missing_slot[:n_missing]

    def _checked(self, active, t) -> np.ndarray:
        """active as int32, after the checks update() promises (one-line errors naming the problem)."""
        active = np.ascontiguousarray(active, dtype=np.int32)
        if active.ndim != 1:
            raise InvalidArgumentError("active must be a 1-d array of row ids")
        if active.shape[0] > self.capacity:
            raise RamCapError(
                f"{active.shape[0]} neurons are active at token {t} but the window holds only "
                f"{self.capacity} slots")
        if active.shape[0] and (active[0] < 0 or _check_active(active, self.n_ff)):
            raise InvalidArgumentError(
                f"active rows must be strictly increasing and inside [0, {self.n_ff})")
        return active

    # -- for the RAM watchdog -----------------------------------------------------------------------

    def set_capacity(self, new_capacity: int) -> None:
        """Change the number of slots. Shrinking evicts the oldest-active neurons first (ties: lowest
        id) and returns the freed pages to the OS; growing past the first allocation reallocates
        (so callers must re-read `slots` afterwards)."""
        new_capacity = int(new_capacity)
        if new_capacity <= 0:
            raise InvalidArgumentError(f"window capacity must be positive, got {new_capacity}")
        if new_capacity > self._allocated:
            self._alloc(new_capacity)
            return
        need = self.n_used - new_capacity
        if need > 0:
            cut_t, cut_id = _eviction_cutoff(self._scratch, self.slot_neuron, self.last_active,
                                             self.n_used, _INT32_MIN, _INT32_MAX, need)
            self.n_used = _compact(self.slots, self.slot_neuron, self.neuron_slot, self.last_active,
                                   self.n_used, _INT32_MAX, cut_t, cut_id)
        self.capacity = new_capacity
        self._release_tail()

    def shrink(self, new_capacity: int) -> None:
        """set_capacity(min(new_capacity, capacity)): never grows."""
        self.set_capacity(min(int(new_capacity), self.capacity))

    def resident_neurons(self) -> np.ndarray:
        """(n_used,) int32 copy of the neurons in slots order (for tests and stats)."""
        return self.slot_neuron[:self.n_used].copy()
