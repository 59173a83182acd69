"""Per-token and per-prompt-chunk statistics of the flash runtime (what `--stats` and the benchmarks
print), and the one place that books a store read into them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadCounts:
    loaded: int = 0         # bundles read from the file (into the window or the staging buffer)
    overflow: int = 0       # chosen neurons the window could not hold, computed in the staging buffer
    bytes_read: int = 0
    read_calls: int = 0
    io_ms: float = 0.0
    mm_ms: float = 0.0      # window bookkeeping (memory management)
    compute_ms: float = 0.0
    head_rows: int = 0      # output head rows computed exactly (n_vocab: the whole head; fewer: its index
                            # stopped early)
    head_bytes: int = 0     # of bytes_read / read_calls, those of the output head
    head_reads: int = 0


@dataclass
class TokenStats(ReadCounts):
    predicted: int = 0      # neurons chosen (summed over layers)
    active: int = 0         # of those, |act(gate . x)| > threshold: exactly computed contributions
    hit_rate: float = 0.0   # chosen neurons already in the window
    rss: int = 0


@dataclass
class ChunkStats(ReadCounts):
    tokens: int = 0         # prompt tokens in the chunk


def add_read(stats: ReadCounts, rs, rows: int = 0, head: bool = False) -> None:
    """Book one store.read_rows call (its ReadStats) and the bundle rows it delivered (or, head=True, a
    read of output head rows)."""
    if head:
        stats.head_bytes += rs.bytes_read
        stats.head_reads += rs.n_reads
    stats.loaded += rows
    stats.bytes_read += rs.bytes_read
    stats.read_calls += rs.n_reads
    stats.io_ms += rs.ms
