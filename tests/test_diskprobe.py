"""Disk probe: a tiny quick probe, the recommendation formula, and the per-device cache."""

import os

import pytest

from gguf_flash.errors import InvalidArgumentError
from gguf_flash.flash import diskprobe
from gguf_flash.flash.diskprobe import KiB, MiB, ProbeRow, probe, recommend

# DESIGN.md section 7, measured on this machine's disk (1 GiB file, O_DIRECT, random offsets)
DESIGN_TABLE = [(4 * KiB, 1, 70.0), (4 * KiB, 4, 166.0), (4 * KiB, 32, 272.0),
                (16 * KiB, 1, 272.0), (16 * KiB, 4, 661.0), (16 * KiB, 32, 700.0),
                (64 * KiB, 1, 700.0), (64 * KiB, 4, 1232.0), (64 * KiB, 32, 1682.0),
                (1 * MiB, 1, 1878.0), (4 * MiB, 1, 2300.0)]


def test_quick_probe_in_a_directory(tmp_path):
    rows = probe(tmp_path, sizes=(4 * KiB, 64 * KiB), threads=(1, 2), seconds=0.05,
                 file_bytes=4 * MiB)
    assert [(r.size, r.threads) for r in rows] == [(4096, 1), (4096, 2), (65536, 1), (65536, 2)]
    assert all(r.mib_s > 0 for r in rows)
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone
    gap, threads = recommend(rows)
    assert threads in (1, 2) and gap % 4096 == 0 and 4096 <= gap <= MiB


def test_probe_an_existing_file(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(2 * MiB))
    rows = probe(f, sizes=(16 * KiB,), threads=(1,), seconds=0.03)
    assert len(rows) == 1 and rows[0].mib_s > 0
    assert f.stat().st_size == 2 * MiB  # read, not replaced
    with pytest.raises(InvalidArgumentError):
        probe(f, sizes=(4 * MiB,), threads=(1,), seconds=0.01)  # larger than the file
    with pytest.raises(InvalidArgumentError):
        probe(f, sizes=(1000,), threads=(1,), seconds=0.01)  # not a multiple of 4096


def test_recommend_on_the_design_table():
    gap, threads = recommend(DESIGN_TABLE)
    assert threads == 32  # best at 64 KiB
    # 4 KiB at 272 MiB/s with 32 threads: 14.4 us per read; times the best 32-thread throughput
    t_op = 4096 / (272.0 * MiB)
    assert gap == round(t_op * 1682.0 * MiB / 4096) * 4096 == 24 * KiB
    only_one = [r for r in DESIGN_TABLE if r[1] == 1]
    gap1, threads1 = recommend(only_one)
    assert threads1 == 1
    assert gap1 == round(4096 / 70.0 * 2300.0 / 4096) * 4096  # ~131 KiB: one thread waits longer
    with pytest.raises(InvalidArgumentError):
        recommend([])


def test_save_and_load_per_device(tmp_path, monkeypatch):
    monkeypatch.setenv("GGUF_FLASH_CACHE", str(tmp_path / "cache"))
    assert diskprobe.cache_dir() == tmp_path / "cache"
    assert diskprobe.load(tmp_path) is None
    rows = [ProbeRow(*r) for r in DESIGN_TABLE]
    where = diskprobe.save(rows, tmp_path)
    assert where == tmp_path / "cache" / "diskprobe.json"
    assert diskprobe.load(tmp_path) == rows
    # same device, another path on it
    (tmp_path / "sub").mkdir()
    assert diskprobe.load(tmp_path / "sub") == rows
    where.write_text("not json")
    assert diskprobe.load(tmp_path) is None
