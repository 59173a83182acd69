"""BundleStore against plain f.seek/f.read, in warm and cold mode, with and without coalescing."""

import os

import numpy as np
import pytest

from gguf_flash.errors import FlashFormatError, InvalidArgumentError
from gguf_flash.flash.store import BundleStore
from gguf_flash.flash.window import Window

ROW = 2916          # a bundle-like row size, not a multiple of anything
N_ROWS = 600
OFFSET = 8192       # 4096-aligned like a flash GGUF's tensor data


def make_file(path, tail=123, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, OFFSET + ROW * N_ROWS + tail, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path


def reference_rows(path, rows):
    with open(path, "rb") as f:
        out = []
        for r in rows:
            f.seek(OFFSET + int(r) * ROW)
            out.append(np.frombuffer(f.read(ROW), np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    return make_file(tmp_path_factory.mktemp("store") / "bundles.bin")


@pytest.mark.parametrize("cold", [False, True])
@pytest.mark.parametrize("gap", [0, 64 * 1024])
@pytest.mark.parametrize("threads", [1, 4])
def test_random_rows_match_reference(bundle_file, cold, gap, threads):
    rng = np.random.default_rng(7)
    with BundleStore(bundle_file, OFFSET, ROW, N_ROWS, cold=cold, n_threads=threads,
                     gap_bytes=gap, max_range=64 * 1024) as store:
        if cold:
            assert store.direct_io or store.fadvise
        dest = np.zeros((N_ROWS + 10, ROW), np.uint8)  # (capacity, row_bytes) uint8
        for trial in range(5):
            n = int(rng.integers(1, 200))
            rows = np.sort(rng.choice(N_ROWS, n, replace=False)).astype(np.int32)
            if trial == 0:
                rows[-1] = N_ROWS - 1  # the last row: O_DIRECT must cope with the file's end
                rows = np.unique(rows)
            slots = rng.permutation(dest.shape[0])[: rows.size].astype(np.int32)
            dest[:] = 0
            st = store.read_rows(rows, dest, slots)
            assert np.array_equal(dest[slots], reference_rows(bundle_file, rows))
            assert st.n_rows == rows.size and st.bytes_read >= rows.size * ROW
            untouched = np.setdiff1d(np.arange(dest.shape[0]), slots)
            assert not dest[untouched].any()
        # contiguous rows into consecutive slots: the straight-into-dest path
        rows = np.arange(100, 160, dtype=np.int32)
        slots = np.arange(5, 65, dtype=np.int32)
        store.read_rows(rows, dest, slots)
        assert np.array_equal(dest[5:65], reference_rows(bundle_file, rows))


def test_file_ending_exactly_at_last_row(tmp_path):
    path = make_file(tmp_path / "exact.bin", tail=0, seed=1)
    rows = np.array([0, N_ROWS - 2, N_ROWS - 1], np.int32)
    for cold in (False, True):
        with BundleStore(path, OFFSET, ROW, N_ROWS, cold=cold, n_threads=2) as store:
            dest = np.empty((3, ROW), np.uint8)
            store.read_rows(rows, dest, np.arange(3, dtype=np.int32))
            assert np.array_equal(dest, reference_rows(path, rows))


def test_coalescing_reduces_read_calls(bundle_file):
    rows = np.arange(0, N_ROWS, 3, dtype=np.int32)  # gaps of two rows (5832 bytes)
    slots = np.arange(rows.size, dtype=np.int32)
    dest = np.empty((rows.size, ROW), np.uint8)
    for cold in (False, True):
        with BundleStore(bundle_file, OFFSET, ROW, N_ROWS, cold=cold, gap_bytes=0) as s:
            naive = s.read_rows(rows, dest, slots)
        assert naive.n_reads == rows.size
        assert np.array_equal(dest, reference_rows(bundle_file, rows))
        dest[:] = 0
        with BundleStore(bundle_file, OFFSET, ROW, N_ROWS, cold=cold, gap_bytes=8192,
                         max_range=256 * 1024) as s:
            merged = s.read_rows(rows, dest, slots)
        assert merged.n_reads <= -(-N_ROWS * ROW // (256 * 1024 - 3 * ROW)) + 1
        assert merged.n_reads < naive.n_reads // 10
        assert np.array_equal(dest, reference_rows(bundle_file, rows))
        # a gap wider than gap_bytes is not read
        with BundleStore(bundle_file, OFFSET, ROW, N_ROWS, cold=cold, gap_bytes=4096) as s:
            st = s.read_rows(np.array([0, 100], np.int32), dest, np.array([0, 1], np.int32))
        assert st.n_reads == 2


def test_cold_fallback_without_o_direct(bundle_file, monkeypatch):
    """Where O_DIRECT is refused at open (older tmpfs), the store falls back to posix_fadvise."""
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with BundleStore(bundle_file, OFFSET, ROW, N_ROWS, cold=True, n_threads=2) as store:
        assert store.fadvise and not store.direct_io
        rows = np.array([3, 4, 9, 500, N_ROWS - 1], np.int32)
        dest = np.empty((5, ROW), np.uint8)
        st = store.read_rows(rows, dest, np.array([4, 3, 2, 1, 0], np.int32))
        assert np.array_equal(dest[::-1], reference_rows(bundle_file, rows))
        assert st.bytes_read == 9 * ROW and st.n_reads == 3  # rows 3..9 in one read, no padding


def test_window_fills_its_slots_from_the_store(bundle_file):
    win = Window(n_ff=N_ROWS, bundle_bytes=ROW, capacity=64, k=2)
    rng = np.random.default_rng(11)
    with BundleStore(bundle_file, OFFSET, ROW, N_ROWS, cold=True, n_threads=2) as store:
        for t in range(20):
            act = np.sort(rng.choice(N_ROWS, 20, replace=False)).astype(np.int32)
            miss, slots = win.update(act, t)
            store.read_rows(miss, win.slots, slots)
            used = win.slot_neuron[:win.n_used]
            assert np.array_equal(win.slots[:win.n_used], reference_rows(bundle_file, used))


def test_changed_file_detected(tmp_path):
    path = make_file(tmp_path / "c.bin", seed=3)
    st = os.stat(path)
    store = BundleStore(path, OFFSET, ROW, N_ROWS, stat=st)
    store.check_unchanged()
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(FlashFormatError):
        store.check_unchanged()
    store.close()
    with pytest.raises(FlashFormatError):  # opened against the stat of the old header
        BundleStore(path, OFFSET, ROW, N_ROWS, stat=st)
    with pytest.raises(FlashFormatError):  # rows beyond the end of the file
        BundleStore(path, OFFSET, ROW, N_ROWS + 10)


def test_bad_arguments(bundle_file):
    with BundleStore(bundle_file, OFFSET, ROW, N_ROWS) as store:
        dest = np.empty((4, ROW), np.uint8)
        with pytest.raises(InvalidArgumentError):
            store.read_rows(np.array([2, 1], np.int32), dest, np.array([0, 1], np.int32))
        with pytest.raises(InvalidArgumentError):
            store.read_rows(np.array([N_ROWS], np.int32), dest, np.array([0], np.int32))
        with pytest.raises(InvalidArgumentError):
            store.read_rows(np.array([1], np.int32), dest, np.array([4], np.int32))
        with pytest.raises(InvalidArgumentError):
            store.read_rows(np.array([1], np.int32), np.empty((4, ROW + 1), np.uint8),
                            np.array([0], np.int32))
        assert store.read_rows(np.empty(0, np.int32), dest, np.empty(0, np.int32)).n_reads == 0
