"""flash/spill.py: arrays parked in an anonymous temporary file come back as they went in."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gguf_flash.flash.spill import Spill


def test_parked_arrays_come_back_whole(tmp_path):
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((64, 24)).astype(np.float16), rng.integers(0, 9, 1000).astype(np.int32),
              np.zeros((0, 5), np.float32), rng.standard_normal((3, 4, 5)).astype(np.float32)[:, ::2]]
    spill = Spill(tmp_path)
    with ThreadPoolExecutor(4) as pool:                          # put from training threads
        parked = list(pool.map(spill.put, arrays * 8))
    for a, p in zip(arrays * 8, parked):
        assert p.shape == a.shape and p.dtype == a.dtype and p.nbytes == a.nbytes
        assert np.array_equal(p.load(), a)
    assert len({p.offset for p in parked if p.nbytes}) == sum(1 for p in parked if p.nbytes)
    spill.close()
    assert list(tmp_path.iterdir()) == []                        # anonymous: nothing left in the directory
