"""Sliding-window slot manager against a plain Python set-based model of the same policy."""

import sys

import numpy as np
import pytest

from gguf_flash.errors import InvalidArgumentError, RamCapError
from gguf_flash.flash.window import Window

BUNDLE = 16  # bytes per slot in these tests; each slot holds its neuron id written as 4 int32


class RefWindow:
    """The policy in plain Python: keep neurons active in tokens t-k+1..t; if over capacity, evict
    the oldest-active kept neurons first, ties by lowest id, never one active at t."""

    def __init__(self, n_ff, capacity, k):
        self.capacity, self.k = capacity, k
        self.la = {}
        self.held = set()

    def update(self, active, t):
        for a in active:
            self.la[a] = t
        missing = sorted(a for a in active if a not in self.held)
        kept = {n for n in self.held if self.la[n] > t - self.k}
        need = len(kept) + len(missing) - self.capacity
        if need > 0:
            cands = sorted((n for n in kept if self.la[n] < t), key=lambda n: (self.la[n], n))
            kept -= set(cands[:need])
        self.held = kept | set(active)
        return missing

    def shrink(self, capacity):
        need = len(self.held) - capacity
        if need > 0:
            order = sorted(self.held, key=lambda n: (self.la[n], n))
            self.held -= set(order[:need])
        self.capacity = capacity


def fill(win, missing, slots):
    """What the store would do: write each missing neuron's id into its slot bytes."""
    for n, s in zip(missing, slots):
        win.slots[s] = np.full(BUNDLE // 4, n, np.int32).view(np.uint8)


def check_invariants(win, active=None):
    used = win.slot_neuron[:win.n_used]
    assert len(set(used.tolist())) == win.n_used
    assert np.array_equal(win.neuron_slot[used], np.arange(win.n_used))
    assert np.count_nonzero(win.neuron_slot >= 0) == win.n_used
    assert win.n_used <= win.capacity
    # slot bytes moved with their neurons
    ids = win.slots[:win.n_used].view(np.int32)  # (n_used, BUNDLE // 4)
    assert np.array_equal(ids, np.repeat(used[:, None], BUNDLE // 4, axis=1))
    if active is not None:
        assert np.all(win.neuron_slot[active] >= 0)


def test_basic_load_and_reuse():
    win = Window(n_ff=10, bundle_bytes=BUNDLE, capacity=10, k=2)
    miss, slots = win.update(np.array([1, 3, 5], np.int32), 0)
    assert miss.tolist() == [1, 3, 5] and slots.tolist() == [0, 1, 2]
    fill(win, miss, slots)
    miss, slots = win.update(np.array([3, 4], np.int32), 1)
    assert miss.tolist() == [4] and slots.tolist() == [3]
    fill(win, miss, slots)
    check_invariants(win, [3, 4])
    assert sorted(win.resident_neurons().tolist()) == [1, 3, 4, 5]


def test_eviction_after_k_tokens():
    win = Window(n_ff=8, bundle_bytes=BUNDLE, capacity=8, k=3)
    fill(win, *win.update(np.array([0, 1], np.int32), 0))
    for t in (1, 2):
        fill(win, *win.update(np.array([2], np.int32), t))
        assert {0, 1} <= set(win.resident_neurons().tolist())  # still inside the last 3 tokens
    fill(win, *win.update(np.array([2], np.int32), 3))
    assert win.resident_neurons().tolist() == [2]  # 0 and 1 not active in tokens 1..3
    check_invariants(win)
    win.k = 1  # adjustable: only the current token's neurons stay
    fill(win, *win.update(np.array([5], np.int32), 4))
    assert win.resident_neurons().tolist() == [5]
    check_invariants(win, [5])


def test_hole_filled_by_last_slot_and_bytes_move():
    win = Window(n_ff=6, bundle_bytes=BUNDLE, capacity=6, k=1)
    fill(win, *win.update(np.array([0, 1, 2, 3], np.int32), 0))
    miss, slots = win.update(np.array([2, 3], np.int32), 1)  # 0 and 1 leave: 3 -> slot 0, 2 -> slot 1
    assert miss.size == 0
    assert win.slot_neuron[:2].tolist() == [3, 2]
    check_invariants(win, [2, 3])


def test_capacity_evicts_oldest_first_never_active():
    win = Window(n_ff=20, bundle_bytes=BUNDLE, capacity=5, k=100)
    fill(win, *win.update(np.array([0, 1], np.int32), 0))
    fill(win, *win.update(np.array([2, 3], np.int32), 1))
    fill(win, *win.update(np.array([4], np.int32), 2))
    miss, slots = win.update(np.array([4, 5, 6], np.int32), 3)  # needs 2 more slots: drop 0 and 1
    assert miss.tolist() == [5, 6]
    fill(win, miss, slots)
    assert sorted(win.resident_neurons().tolist()) == [2, 3, 4, 5, 6]
    miss, slots = win.update(np.array([7], np.int32), 4)  # tie between 2 and 3 (t=1): lowest id goes
    fill(win, miss, slots)
    assert sorted(win.resident_neurons().tolist()) == [3, 4, 5, 6, 7]
    check_invariants(win, [7])


def test_active_beyond_capacity_raises():
    win = Window(n_ff=20, bundle_bytes=BUNDLE, capacity=3, k=2)
    with pytest.raises(RamCapError):
        win.update(np.arange(4, dtype=np.int32), 0)
    with pytest.raises(InvalidArgumentError):
        win.update(np.array([3, 1], np.int32), 0)  # not sorted
    with pytest.raises(InvalidArgumentError):
        win.update(np.array([1, 20], np.int32), 0)  # out of range
    with pytest.raises(InvalidArgumentError):
        win.update(np.array([-1, 2], np.int32), 0)
    assert win.n_used == 0  # nothing changed by refused calls


def test_shrink_and_grow():
    win = Window(n_ff=50, bundle_bytes=4096, capacity=40, k=10)
    ref = RefWindow(50, 40, 10)
    rng = np.random.default_rng(3)
    for t in range(6):
        act = np.sort(rng.choice(50, 6, replace=False)).astype(np.int32)
        miss, slots = win.update(act, t)
        assert miss.tolist() == ref.update(act.tolist(), t)
        win.slots[slots] = 0
        for n, s in zip(miss, slots):
            win.slots[s, :4] = np.array([n], np.int32).view(np.uint8)
    win.shrink(10)
    ref.shrink(10)
    assert win.capacity == 10 and win.slots.shape == (40, 4096)  # same buffer, tail pages released
    assert set(win.resident_neurons().tolist()) == ref.held
    ids = win.slots[:win.n_used, :4].copy().view(np.int32)[:, 0]
    assert np.array_equal(ids, win.slot_neuron[:win.n_used])
    win.shrink(20)  # never grows
    assert win.capacity == 10
    win.set_capacity(60)  # beyond the first allocation: reallocated, contents kept
    assert win.capacity == 60 and win.slots.shape == (60, 4096)
    ids = win.slots[:win.n_used, :4].copy().view(np.int32)[:, 0]
    assert np.array_equal(ids, win.slot_neuron[:win.n_used])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED's Linux semantics")
def test_shrink_frees_the_released_slots():
    """A shrink frees the tail's memory, not just its mapping: the slots are private anonymous memory.
    They were shared (mmap.mmap(-1, n)), whose pages MADV_DONTNEED only unmaps: RSS fell while the rows
    stayed in RAM, and the released slots read back their old bytes."""
    n = 256                                        # 4 MiB of slots, 16 KiB each
    win = Window(n_ff=n, bundle_bytes=16384, capacity=n, k=1)
    win.update(np.arange(n, dtype=np.int32), 0)
    win.slots[:] = 7
    win.shrink(64)
    tail = np.frombuffer(win._mm, np.uint8)[64 * 16384:]
    assert tail.max() == 0                          # freed: the pages read as new zero pages
    assert np.all(win.slots[:64] == 7)             # the kept slots keep their rows


@pytest.mark.parametrize("seed,n_ff,capacity,k,n_active", [
    (0, 64, 64, 3, 10),     # roomy: pure k-window
    (1, 64, 16, 5, 8),      # tight: capacity evictions every token
    (2, 200, 40, 4, 40),    # active == capacity at times
    (3, 30, 30, 1, 0),      # empty tokens allowed
])
def test_random_sequences_vs_reference(seed, n_ff, capacity, k, n_active):
    rng = np.random.default_rng(seed)
    win = Window(n_ff=n_ff, bundle_bytes=BUNDLE, capacity=capacity, k=k)
    ref = RefWindow(n_ff, capacity, k)
    hot = rng.permutation(n_ff)[: max(n_ff // 4, 1)]  # skewed like real activations
    for t in range(150):
        if t == 75:
            win.k = ref.k = k + 2
        n = int(rng.integers(0, n_active + 1)) if n_active else 0
        pool = hot if rng.random() < 0.5 else np.arange(n_ff)
        act = np.sort(rng.choice(pool, min(n, pool.size), replace=False)).astype(np.int32)
        miss, slots = win.update(act, t)
        want = ref.update(act.tolist(), t)
        assert miss.tolist() == want
        assert slots.tolist() == list(range(win.n_used - len(want), win.n_used))
        fill(win, miss, slots)
        assert set(win.resident_neurons().tolist()) == ref.held
        check_invariants(win, act)
