"""budget.rss(): the watchdog's RSS, read every token, is psutil's figure, and a forked child's own."""

import multiprocessing as mp

import numpy as np
import psutil
import pytest

from gguf_flash.flash import budget

MiB = 1 << 20


def test_rss_is_psutils_rss():
    before = budget.rss()
    a = np.ones(64 * MiB // 8)              # 64 MiB, every page written
    mine, theirs = budget.rss(), psutil.Process().memory_info().rss
    assert abs(mine - theirs) < 2 * MiB
    assert mine - before >= 60 * MiB
    del a


def _child_rss(conn):
    before = budget.rss()
    a = np.ones(96 * MiB // 8)              # the child's own 96 MiB (the parent's RSS does not move)
    conn.send((before, budget.rss(), psutil.Process().memory_info().rss))
    del a


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_a_forked_child_reads_its_own_rss():
    budget.rss()                            # the parent's descriptor is open before the fork
    ctx = mp.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_rss, args=(w,))
    p.start()
    before, mine, theirs = r.recv()
    p.join()
    assert abs(mine - theirs) < 2 * MiB
    assert mine - before >= 80 * MiB
