"""The RAM plan is a pure function of sizes, calibration frequencies and disk throughput (flash/plan.py):
what it keeps resident at each cap, and the numbers it refuses with."""

import numpy as np
import pytest

from gguf_flash.errors import RamCapError
from gguf_flash.flash.plan import HEAD_CHUNK, HEADROOM, PlanInput, make_plan

MiB = 1 << 20


def _inp(cap, **kw):
    n_ff, L = 1024, 4
    freq = [np.linspace(1.0, 0.0, n_ff, dtype=np.float32) for _ in range(L)]   # hot-first
    d = dict(cap=cap, baseline=100 * MiB, fixed={"attention": 10 * MiB}, mode="flash", selector="auto",
             gate_bytes=4 * MiB, pred_bytes=8 * MiB, head_bytes=30 * MiB, embd_bytes=0,
             bundle_bytes=[3000] * L, gate_part=[1000] * L, freq=freq, staging_rows=256,
             small_mib_s=300.0, large_mib_s=2000.0, path="m.flash.gguf")
    d.update(kw)
    return PlanInput(**d)


def test_smallest_cap_streams_the_head_and_keeps_one_slot_per_layer():
    floor = 100 * MiB + 10 * MiB + 4 * MiB + 256 * 2000 + 4 * 2000 + HEAD_CHUNK + HEADROOM
    p = make_plan(_inp(floor, selector="gate"))
    assert p.selector == "gate" and p.head == "streamed" and p.capacities == [1] * 4
    assert p.slot_bytes == [2000] * 4          # gate rows resident: slots hold up|down only
    with pytest.raises(RamCapError, match=r"needs at least \d+ MiB \(100 MiB runtime .*cap is") as e:
        make_plan(_inp(floor - 1, selector="gate"))
    assert e.value.need == floor


def test_window_slots_against_the_head_by_ms_saved_per_byte():
    """Scattered misses (no coalescing) are read at 300 MiB/s, the head at 2000: slots of neurons active
    more often than 300/2000 = 0.15 of tokens save more per byte and come first, so with 30 MiB over the
    floor the 28 MiB head (which alone would fit) stays streamed. When the active rows are dense enough
    to coalesce into long reads, a slot saves at most what a head byte does, and the head comes first."""
    floor = 100 * MiB + 10 * MiB + 4 * MiB + 256 * 2000 + 4 * 2000 + HEAD_CHUNK + HEADROOM
    scattered = make_plan(_inp(floor + 30 * MiB, gap_bytes=0, selector="gate"))
    assert scattered.head == "streamed" and scattered.capacities == [1024] * 4
    dense = make_plan(_inp(floor + 40 * MiB, gap_bytes=64 << 10, selector="gate"))
    # a slot saves its whole bundle span (3000 B) per 2000 B of RAM: slots first, then the head
    assert dense.head == "resident" and dense.capacities == [1024] * 4
    assert dense.resident["output head"] == 30 * MiB
    tight = make_plan(_inp(floor + 5 * MiB, gap_bytes=0, selector="gate"))  # slots fill hot-first: lower rows first
    assert tight.head == "streamed" and all(1 < c < 1024 for c in tight.capacities)
    assert tight.window_bytes <= floor + 5 * MiB - tight.must_have - HEADROOM
    roomy = make_plan(_inp(400 * MiB))
    assert roomy.head == "resident" and roomy.capacities == [1024] * 4


def test_auto_selector_by_expected_reading():
    """Scattered activity (1% of tokens, reads do not coalesce): the exact gate rows save far more than
    their RAM costs, and where they do not fit the smaller predictor does. Dense activity (80%, reads
    coalesce into whole layers): selecting saves no reading, so at a tight cap the gate rows' RAM goes to
    the window instead ("bundle": every bundle's own gate decides, with the same thresholds)."""
    sparse_freq = [np.full(1024, 0.01, np.float32) for _ in range(4)]
    p = make_plan(_inp(400 * MiB, freq=sparse_freq, gap_bytes=0))
    assert p.selector == "gate"
    small = make_plan(_inp(124 * MiB, freq=sparse_freq, gap_bytes=0, gate_bytes=50 * MiB, pred_bytes=5 * MiB))
    assert small.selector == "predictor" and small.slot_bytes == [3000] * 4   # whole bundles read
    assert "predictors" in small.resident and "gate rows" not in small.resident
    # a file without a predictor in every layer (pred_bytes 0): the same cap falls back to bundle
    none = make_plan(_inp(124 * MiB, freq=sparse_freq, gap_bytes=0, gate_bytes=50 * MiB, pred_bytes=0))
    assert none.selector == "bundle" and "predictors" not in none.resident
    dense_freq = [np.full(1024, 0.8, np.float32) for _ in range(4)]
    tight = make_plan(_inp(130 * MiB, freq=dense_freq, gate_bytes=8 * MiB))
    assert tight.selector == "bundle" and "gate rows" not in tight.resident and tight.slot_bytes == [3000] * 4
    assert "expected" in tight.describe()
    roomy = make_plan(_inp(400 * MiB, freq=dense_freq, gate_bytes=8 * MiB))
    assert roomy.selector == "gate" and roomy.read_ms == 0.0


def test_product_selector_holds_gate_and_up_rows_and_reads_only_down():
    """With the file's product criterion (up_bytes, prod_freq): slots hold the down part only, gate and
    up rows are resident, and auto picks it where its fewer, smaller reads save the most: when the
    product criterion leaves far fewer rows active than the gate criterion and there is room for both
    parts' rows. Without the criterion (up_bytes 0) it is never a candidate."""
    gate_freq = [np.full(1024, 0.5, np.float32) for _ in range(4)]
    prod_freq = [np.full(1024, 0.2, np.float32) for _ in range(4)]
    kw = dict(freq=gate_freq, prod_freq=prod_freq, up_bytes=4 * MiB, up_part=[1000] * 4, gap_bytes=0,
              head_bytes=0)
    p = make_plan(_inp(140 * MiB, selector="product", **kw))
    assert p.selector == "product" and p.slot_bytes == [1000] * 4
    assert p.resident["gate and up rows"] == 8 * MiB and "gate rows" not in p.resident
    auto = make_plan(_inp(125 * MiB, **kw))
    assert auto.selector == "product" and "expected" in auto.describe()
    assert make_plan(_inp(125 * MiB, freq=gate_freq, gap_bytes=0, head_bytes=0)).selector != "product"


def test_staging_grows_only_where_the_cap_has_room_for_it():
    """The FFN staging is staging_rows at the floor (so the smallest cap is unchanged) and grows to
    staging_rows_max where the extra bytes are at most 1/8 of the room over the floor; without a cap,
    always. Naive mode keeps its own (a whole layer)."""
    floor = 100 * MiB + 10 * MiB + 4 * MiB + 256 * 2000 + 4 * 2000 + HEAD_CHUNK + HEADROOM
    kw = dict(selector="gate", staging_rows_max=1024)
    extra = (1024 - 256) * 2000
    tight = make_plan(_inp(floor, **kw))
    assert tight.staging_rows == 256 and tight.resident["FFN staging"] == 256 * 2000
    short = make_plan(_inp(floor + 8 * extra - 1, **kw))
    assert short.staging_rows == 256
    roomy = make_plan(_inp(floor + 8 * extra, **kw))
    assert roomy.staging_rows == 1024 and roomy.resident["FFN staging"] == 1024 * 2000
    assert roomy.window_bytes <= floor + 8 * extra - roomy.must_have - HEADROOM
    assert make_plan(_inp(None, **kw)).staging_rows == 1024


def test_naive_and_dense_modes():
    naive = make_plan(_inp(400 * MiB, mode="naive", selector="none", staging_rows=1024))
    assert naive.capacities == [0] * 4 and naive.resident["FFN staging"] == 1024 * 3000
    dense = make_plan(_inp(None, mode="dense", selector="none"))
    assert dense.capacities == [1024] * 4 and dense.head == "resident"


def test_startup_peak_counts():
    with pytest.raises(RamCapError, match="peaked at 300 MiB") as e:
        make_plan(_inp(250 * MiB, startup_peak=300 * MiB))
    assert e.value.need == 300 * MiB
