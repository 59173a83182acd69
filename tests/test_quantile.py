"""flash/quantile.py: np.quantile without a copy, against np.quantile itself (explicit seeds)."""

import numpy as np
import pytest

from gguf_flash.flash import quantile as qm

GRID = np.array([round(0.05 * k, 2) for k in range(1, 19)])      # the converter's sparsity grid


def arrays():
    rng = np.random.default_rng(3)
    yield np.abs(rng.standard_normal((300, 700))).astype(np.float32) * rng.random(700).astype(np.float32)
    yield rng.integers(0, 5, (200, 50)).astype(np.float32)        # ties everywhere
    yield np.zeros((40, 30), np.float32)                            # one value
    yield rng.standard_normal(7).astype(np.float32)
    yield np.float32([2.5])


@pytest.mark.parametrize("i", range(5))
def test_quantiles_equal_numpys(i):
    A = list(arrays())[i]
    before = A.copy()
    got = qm.quantiles(A, GRID)
    assert np.array_equal(got, np.quantile(A, GRID))
    assert np.array_equal(A, before)                                # only read
    q = np.array([0.0, 0.001, 0.5, 0.999, 1.0])
    assert np.array_equal(qm.quantiles(A, q), np.quantile(A, q))


def test_brackets_that_miss_are_widened(monkeypatch):
    """A sample too small and brackets too narrow to hold the ranks: the pass is repeated, wider, until
    every order statistic is exact."""
    monkeypatch.setattr(qm, "SAMPLE", 16)
    monkeypatch.setattr(qm, "SIGMAS", 0.0)
    monkeypatch.setattr(qm, "BLOCK", 1000)
    rng = np.random.default_rng(4)
    for A in (rng.standard_normal((100, 80)).astype(np.float32), rng.integers(0, 3, 5000).astype(np.float32)):
        ranks = np.array([0, 1, 17, len(A.reshape(-1)) // 2, A.size - 1])
        assert np.array_equal(qm.order_statistics(A.reshape(-1), ranks), np.sort(A.reshape(-1))[ranks])
        assert np.array_equal(qm.quantiles(A, GRID), np.quantile(A, GRID))
