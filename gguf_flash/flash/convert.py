"""GGUF -> flash GGUF (docs/flash-gguf.md): calibrate, choose thresholds, order neurons hot-first,
bundle gate|up|down rows, train predictors, write atomically.

Phases (each with a progress bar when `progress` is true); the model runs layer-major (layerwise.py), so
RSS follows the model's widths, not its size (convert_ram.py):
  1. calibrate   dense model over calibration text, a layer at a time -> per-layer FFN inputs (to a temp
                 file, calibrate.py) and, right there, the layer's |act(gate . x)| and product quantiles
  2. sparsity    held-out perplexity at each grid point (one layer-major pass each); the default
                 sparsity is the largest whose held-out perplexity stays within 2% of dense (CATS); the
                 same for the product criterion |act(gate . x) (up . x)| ||down_i|| (the product
                 selector's), which keeps more of the model at the same sparsity; with allocate, a
                 sparsity per layer instead (allocate.py: greedy on a training chunk's loss)
  2b. head index  the output head's calibrated preview (head_build.py), on the model's final hidden
                 states of the calibration text and of its own greedy continuations
  3. predictors  per layer, the smallest rank whose predictor reaches the target recall (predictor.py);
                 with predictor="auto" only for layers where every rank it may pick is stored in fewer
                 bytes than the layer's gate rows (the runtime prefers the exact gate rows otherwise),
                 "always" every layer, "never" none; a layer without one is not trained at all
  4. write       every non-FFN tensor byte for byte, then bundles (gate, up copied; down columns
                 re-quantized), neuron ids, frequencies and predictors; temp file renamed on success
"""

from __future__ import annotations

import logging
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, quants

from .. import models
from ..atomic import atomic_output
from ..config import ACT_GELU_TANH, ACT_RELU, ACT_SILU, config_from_gguf
from ..errors import InvalidArgumentError
from ..gguf_file import GGUFFile
from .. import firstrun
from ..kernels import release_compiler_pages
from ..model import Model
from ..tokenizer import tokenizer_from_gguf
from . import format as ff
from .allocate import bisect_path, greedy_path, layer_costs
from .budget import PeakSampler, parse_size
from .calibrate import calibrate, read_calibration_text
from .head_build import build_head_index, calibration_states, index_rank
from .convert_ram import NEURON_BLOCK, convert_ram
from .layerwise import LayerPass
from .plan import MiB
from .predictor import (DEFAULT_RANKS, GateRows, single_threaded_blas, active_mask, fit_smallest_rank,
                        gate_basis, predictor_bytes, train_predictor)
from .quantile import quantiles
from .spill import Parked, Spill

log = logging.getLogger(__name__)

ACT_NAMES = {ACT_SILU: "silu", ACT_GELU_TANH: "gelu", ACT_RELU: "relu"}
SPARSITY_GRID = tuple(round(0.05 * k, 2) for k in range(1, 19))   # 0.05 .. 0.9
HELD_OUT = 0.25            # the last quarter of the calibration chunks is held out
PPL_BUDGET = 1.02          # default sparsity: held-out perplexity within 2% of dense
# allocate=True (allocate.py): the grid sparsities each layer may take (besides dense: tools/bench_alloc.py
# measured these on Gemma 3; each level costs ~n_layer / 2 passes), and the training chunks (the last
# ones) whose loss drives the choice; the held-out chunks only judge it
ALLOC_LEVELS = {"gate": (0.2, 0.3), "product": (0.3, 0.5)}
DRIVE_CHUNKS = 1
DOWN_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32")
PREDICTOR_CHOICES = ("auto", "always", "never")


@dataclass
class ConvertReport:
    out: str
    sparsity: float
    curve: list                     # [(sparsity, held-out ppl)], sparsity 0 = dense
    thresholds: list
    layer_sparsity: list
    ranks: list                     # per layer, 0: no predictor stored
    recall: list
    precision: list
    predictor_bytes: int
    ffn_bytes: int
    bundle_bytes: int
    seconds: float
    peak_rss_mb: float
    phases: dict = field(default_factory=dict)
    head_index: object = None       # head_build.HeadIndex or None
    head_bytes: int = 0
    prod_sparsity: float = 0.0      # the product criterion's (0: not stored)
    prod_curve: list = field(default_factory=list)
    prod_layer_sparsity: list = field(default_factory=list)
    phase_peak_mb: dict = field(default_factory=dict)   # peak RSS by phase, sampled in-process every 10 ms
    sampled_peak_mb: float = 0.0    # the same over the whole conversion
    layer_target: list = field(default_factory=list)       # per layer, the grid sparsity chosen (0: dense)
    prod_layer_target: list = field(default_factory=list)  # the same for the product criterion
    allocated: bool = False         # per-layer allocation (allocate.py), not one sparsity for all layers


def _progress(enabled, total, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="", leave=True, dynamic_ncols=True)


def dequant(f, name) -> np.ndarray:
    """(n_rows, n_cols) float32 of a whole 2-D weight, NEURON_BLOCK rows at a time (tests; the converter
    itself reads the gate through gate_rows)."""
    info = f.tensor(name)
    out = np.empty((info.n_rows, info.ne[0]), np.float32)
    for r0 in range(0, info.n_rows, NEURON_BLOCK):
        D = dequant_rows(f, name, r0, r0 + NEURON_BLOCK)
        out[r0:r0 + len(D)] = D
    return out


def gate_rows(f, name) -> GateRows:
    """A 2-D weight as (n_rows, n_cols) float32 rows dequantized block by block when read (predictor.py),
    never whole: a TinyLlama gate in float32 is 44 MiB, per training thread."""
    info = f.tensor(name)
    return GateRows((info.n_rows, info.ne[0]), lambda r0, r1: dequant_rows(f, name, r0, r1))


def _heldout_nll(lp, cal, thresholds, scale=None) -> float:
    """Mean NLL over the held-out calibration chunks with these FFN thresholds (zeros: dense), on
    |act(gate)|, or with scale (n_layer, n_ff) on the product |act(gate) up| * scale; one layer-major
    pass (layerwise.LayerPass)."""
    total, n = lp.nll(cal.sequences(held_out=True), thresholds, scale)
    return total / max(n, 1)


def _search(ppl_at, grid, dense_ppl, fixed: bool, full_curve: bool):
    """The largest grid index whose held-out perplexity stays within PPL_BUDGET of dense (-1: none),
    by bisection (perplexity grows with sparsity), or 0 for a fixed --sparsity (evaluated for the curve)."""
    if fixed:
        ppl_at(0)
        return 0
    if full_curve:
        for j in range(len(grid)):
            ppl_at(j)
    lo, hi = -1, len(grid)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ppl_at(mid) <= dense_ppl * PPL_BUDGET else (lo, mid)
    return lo


def dequant_rows(f, name, r0, r1) -> np.ndarray:
    """(r1 - r0, n_cols) float32 of rows r0..r1 of a 2-D weight."""
    info = f.tensor(name)
    return quants.dequantize(f.raw(name)[r0:r1], GGMLQuantizationType(info.qtype)).astype(np.float32, copy=False)


def _down_norms(f, il, n_ff) -> np.ndarray:
    """(n_ff,) f32: the norm of each neuron's down column (the product criterion's scale)."""
    name = f"blk.{il}.ffn_down.weight"
    ss = np.zeros(n_ff, np.float64)
    for r0 in range(0, f.tensor(name).n_rows, NEURON_BLOCK):
        D = dequant_rows(f, name, r0, r0 + NEURON_BLOCK)                    # (<= block, n_ff)
        ss += np.einsum("ij,ij->j", D, D, dtype=np.float64)
    return np.sqrt(ss).astype(np.float32)


def _gate_scores(f, il, X, act, n_ff) -> np.ndarray:
    """(n, n_ff) f32 |act(gate_i . x)| for the rows of X (n, n_embd); the gate dequantized NEURON_BLOCK
    rows at a time (the product criterion's scores: _times_up of these)."""
    out = np.empty((len(X), n_ff), np.float32)
    for r0 in range(0, n_ff, NEURON_BLOCK):
        r1 = min(n_ff, r0 + NEURON_BLOCK)
        out[:, r0:r1] = _act_abs(X @ dequant_rows(f, f"blk.{il}.ffn_gate.weight", r0, r1).T, act)
    return out


def _times_up(f, il, X, A, up_scale) -> None:
    """A (n, n_ff) *= |up_i . x| * up_scale_i, in place."""
    for r0 in range(0, A.shape[1], NEURON_BLOCK):
        r1 = min(A.shape[1], r0 + NEURON_BLOCK)
        A[:, r0:r1] *= np.abs(X @ dequant_rows(f, f"blk.{il}.ffn_up.weight", r0, r1).T)
        A[:, r0:r1] *= up_scale[r0:r1]


def _column_counts(A, thresholds, rows: int = 512) -> np.ndarray:
    """(len(thresholds), n_ff) int64: per column of A (n, n_ff), how many rows exceed each threshold;
    `rows` rows at a time (a whole (n, n_ff) bool per threshold was 17 MiB on TinyLlama)."""
    out = np.zeros((len(thresholds), A.shape[1]), np.int64)
    for r in range(0, len(A), rows):
        for k, t in enumerate(thresholds):
            out[k] += np.count_nonzero(A[r:r + rows] > t, axis=0)
    return out


def _product_share(f, il, X, act, up_scale, thresholds) -> np.ndarray:
    """(len(thresholds),) float: the share of (token, neuron) pairs of X (n, n_embd) whose product score
    |act(gate_i . x) (up_i . x)| * up_scale_i exceeds each threshold, NEURON_BLOCK neurons at a time
    (the same products as _times_up's, never all at once)."""
    n_ff = len(up_scale)
    count = np.zeros(len(thresholds), np.int64)
    for r0 in range(0, n_ff, NEURON_BLOCK):
        r1 = min(n_ff, r0 + NEURON_BLOCK)
        P = _act_abs(X @ dequant_rows(f, f"blk.{il}.ffn_gate.weight", r0, r1).T, act)    # (n, <= block)
        P *= np.abs(X @ dequant_rows(f, f"blk.{il}.ffn_up.weight", r0, r1).T)
        P *= up_scale[r0:r1]
        for k, t in enumerate(thresholds):
            count[k] += np.count_nonzero(P > t)
    return count / (len(X) * n_ff)


@dataclass
class _SparsityStats:
    """Per-layer statistics of both criteria, filled by the calibration pass a layer at a time (`add`):
    q (n_layer, grid) the |act(g)| quantiles of the training tokens; qp the product's; dn (n_layer, n_ff)
    the down columns' norms; p_count (n_layer, grid + 1, n_ff) how many training tokens choose each
    neuron by the product at threshold 0 and at each grid quantile; p_held (n_layer, grid + 1) the
    held-out share chosen (frequencies and layer sparsity once a sparsity is chosen)."""
    f: object
    cfg: object
    grid: np.ndarray
    product: bool

    def __post_init__(self):
        L, G, n_ff = self.cfg.n_layer, len(self.grid), self.cfg.n_ff
        self.q = np.zeros((L, G), np.float32)
        self.qp = np.zeros((L, G), np.float32)
        self.dn = np.zeros((L, n_ff), np.float32) if self.product else None
        self.p_count = np.zeros((L, G + 1, n_ff), np.int32) if self.product else None
        self.p_held = np.zeros((L, G + 1)) if self.product else None

    def add(self, il, X, n_train):
        release_compiler_pages()   # the pass's kernels are loaded by now: LLVM's ~70 MiB need not stay
        act, f, n_ff = self.cfg.activation, self.f, self.cfg.n_ff
        if act == ACT_RELU:
            return
        Xt, Xv = X[:n_train], X[n_train:]
        A = _gate_scores(f, il, Xt, act, n_ff)                             # (n_train, n_ff)
        self.q[il] = quantiles(A, self.grid)       # np.quantile's, without its copy of A (this phase's peak)
        if self.product:
            self.dn[il] = _down_norms(f, il, n_ff)
            _times_up(f, il, Xt, A, self.dn[il])                               # |act(g) u| ||down_i||
            self.qp[il] = quantiles(A, self.grid)
            thresholds = (0.0, *self.qp[il])
            self.p_count[il] = _column_counts(A, thresholds)
            self.p_held[il] = _product_share(f, il, Xv, act, self.dn[il], thresholds)   # held-out tokens
        del A
        _release_freed_memory()


def exercise_kernels(f) -> tuple:
    """Every compiled call of a conversion, once, on a few tokens of the model `f` itself: numba compiles
    (or loads from its cache) exactly the specializations convert() uses, for the model's type set
    (kernels/dispatch.py), which it returns. The first-run child (firstrun.py) calls this."""
    from .layerwise import Sequence
    model = Model(f, n_ctx=64)
    lp = LayerPass(model)
    seqs = [Sequence(np.arange(8, dtype=np.int64)), Sequence(np.arange(3, dtype=np.int64))]
    lp.run(seqs, on_layer=lambda il, X: None, capture=True)
    lp.nll(seqs)
    lp.nll(seqs, np.ones(model.cfg.n_layer, np.float32), np.ones((model.cfg.n_layer, model.cfg.n_ff), np.float32))
    lp.greedy_states([[1, 2, 3]], 2)                 # the head index's greedy continuations
    return model.w.ts


def _compile_out_of_process(f, progress: bool) -> None:
    """Compile the kernels in a child process first (firstrun.ensure_compiled): on a fresh clone LLVM's
    compiling memory would add to the converter's own peak RSS (802 vs 579 MiB on SmolLM2). Once they
    are cached this costs a marker's lookup."""
    from ..model import Weights
    firstrun.ensure_compiled(f.path, "convert", Weights(f, config_from_gguf(f)).ts, progress=progress)


def _release_freed_memory():
    """Hand freed heap memory back to the OS (glibc malloc_trim), and LLVM's code pages (kernels.
    release_compiler_pages: ~70 MiB, which loading a cached kernel faults back in; the model releases
    them only after its first whole pass, so they sat in the calibration's RSS). Freed numpy temporaries
    of a few MB stay in glibc's per-thread arenas otherwise (its mmap threshold grows after the first
    large free), and RSS, which the converter's memory target counts, keeps them."""
    release_compiler_pages()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _act_abs(G, act):
    if act == ACT_RELU:
        return np.maximum(G, 0)
    if act == ACT_GELU_TANH:
        return np.abs(0.5 * G * (1 + np.tanh(0.7978845608 * (G + 0.044715 * G ** 3))))
    return np.abs(G / (1 + np.exp(-G)))


def convert(src, dst, *, calib=None, calib_tokens: int = 4096, sparsity: float | None = None,
            rank: int | None = None, down_type: str = "Q8_0", force: bool = False,
            target_recall: float = 0.95, full_curve: bool = False, predictor: str = "auto",
            head_index: bool = True, head_index_rank: int | None = None, product: bool = True,
            allocate: bool = False, max_ram=None, progress: bool = False) -> ConvertReport:
    """Write the flash GGUF of `src` to `dst` (see the module docstring). full_curve evaluates the
    held-out perplexity at every grid sparsity (the default bisects the grid: 5 evaluations, not 18).
    predictor: "auto" (a layer's predictor only where it is smaller than its gate rows), "always",
    "never". product: also store the product criterion (gated activations; the product selector).
    A given `sparsity` applies to both criteria, in every layer. allocate: a sparsity per layer instead
    (allocate.py: greedy on the loss of training chunks, judged on the held-out ones; slower, see
    docs/design.md). max_ram ("1.5G", bytes): refused before the model is read
    when below the floor convert_ram.py estimates from the model's shape; it sets the training threads."""
    args = dict(locals())
    sampler = PeakSampler()
    try:
        return _convert(sampler, **args)
    finally:
        sampler.close()


def _convert(sampler, src, dst, *, calib, calib_tokens, sparsity, rank, down_type, force, target_recall, full_curve,
             predictor, head_index, head_index_rank, product, allocate, max_ram, progress) -> ConvertReport:
    t_start = time.perf_counter()
    src_path = models.resolve(src)
    dst = Path(dst)
    if dst.exists() and not force:
        raise InvalidArgumentError(f"{dst}: exists (use --force to overwrite)")
    if down_type not in DOWN_TYPES:
        raise InvalidArgumentError(f"--down-type {down_type}: choose one of {', '.join(DOWN_TYPES)}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise InvalidArgumentError(f"--sparsity must be in [0, 1), got {sparsity}")
    if allocate and sparsity is not None:
        raise InvalidArgumentError("--allocate chooses a sparsity per layer: it cannot be combined with --sparsity")
    if rank is not None and rank < 1:
        raise InvalidArgumentError(f"--rank must be >= 1, got {rank}")
    if head_index_rank is not None and head_index_rank < 0:
        raise InvalidArgumentError(f"--head-index-rank must be >= 0, got {head_index_rank}")
    if predictor not in PREDICTOR_CHOICES:
        raise InvalidArgumentError(f"--predictor {predictor}: choose one of {', '.join(PREDICTOR_CHOICES)}")
    if not dst.parent.is_dir():
        raise InvalidArgumentError(f"{dst}: its directory does not exist")
    f = GGUFFile(src_path)
    if ff.is_flash(f):
        raise InvalidArgumentError(f"{src_path}: already a flash GGUF")
    chunk = 512
    cfg = config_from_gguf(f)      # refuses an unknown architecture before the compile child runs
    for il in range(cfg.n_layer):
        for part in ("ffn_gate", "ffn_up", "ffn_down"):
            f.tensor(f"blk.{il}.{part}.weight")  # refuses a file without a gated FFN
    # the ranks a layer's predictor may have: --rank, or the search's candidates that fit the matrix
    max_rank = min(cfg.n_embd, cfg.n_ff)
    ranks = (min(rank, max_rank),) if rank is not None else \
        tuple(r for r in DEFAULT_RANKS if r <= max_rank) or (max_rank,)
    trained = [_wants_predictor(predictor, max(ranks), cfg, f.tensor(f"blk.{il}.ffn_gate.weight").qtype)
               for il in range(cfg.n_layer)]
    head_name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    head_bytes = f.tensor(head_name).n_bytes
    r = 0 if not head_index else index_rank(cfg.n_vocab, cfg.n_embd, head_bytes) \
        if head_index_rank is None else min(int(head_index_rank), cfg.n_embd - 1)
    # the RAM each phase needs, from the shape (nothing of the model is read yet)
    cap = parse_size(max_ram) if max_ram is not None else None
    ram = convert_ram(f, cfg, calib_tokens, chunk, HELD_OUT, any(trained), r, head_bytes, max(ranks),
                      len(SPARSITY_GRID) if sparsity is None else 1)
    if cap is not None and cap < ram.floor:
        parts = ", ".join(f"{k} {v / MiB:.0f}" for k, v in ram.phases.items())
        raise InvalidArgumentError(
            f"{src_path}: --max-ram {cap // MiB} MiB is below this conversion's floor of {-(-ram.floor // MiB)} "
            f"MiB (the process {ram.base / MiB:.0f} MiB + its largest phase; MiB by phase: {parts}); "
            f"raise the cap, or lower --calib-tokens ({calib_tokens})")
    n_threads = ram.threads(cap, os.cpu_count() or 1)
    _compile_out_of_process(f, progress)
    model = Model(f, n_ctx=chunk)
    tok = tokenizer_from_gguf(f)
    text, source = read_calibration_text(calib)
    phases, phase_peak = {}, {}

    # ---- 1. calibration, layer-major, with each layer's sparsity statistics ----
    t = time.perf_counter()
    act = cfg.activation
    product = bool(product) and act != ACT_RELU
    grid = np.array(SPARSITY_GRID if sparsity is None else sorted({sparsity}), np.float64)
    stats = _SparsityStats(f, cfg, grid, product)
    lp = LayerPass(model)
    bar = _progress(progress, cfg.n_layer, "calibrate")
    cal = calibrate(model, tok, text, calib_tokens, chunk, HELD_OUT, on_layer=stats.add, spill_dir=dst.parent,
                    spill_owner=dst, progress=(lambda i, n: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    phases["calibrate"] = time.perf_counter() - t
    phase_peak["calibrate"] = sampler.mark() / MiB

    # ---- 2. the sparsity curves (gate criterion; product criterion), on held-out text ----
    t = time.perf_counter()
    q_train, qp_train, dn, p_count, p_held = stats.q, stats.qp, stats.dn, stats.p_count, stats.p_held
    L = cfg.n_layer
    n_search = 1 if sparsity is not None else (len(grid) if full_curve else 5)
    levels = {k: [int(np.argmin(np.abs(grid - x))) for x in v] for k, v in ALLOC_LEVELS.items()}
    drive = cal.sequences(held_out=False)[-DRIVE_CHUNKS:]
    n_alloc = {k: 1 + L * len(v) + int(np.ceil(np.log2(L * len(v) + 1))) + 1 for k, v in levels.items()}
    n_bar = 1 + (n_search * (1 + product) if not allocate else
                 (n_alloc["gate"] + product * n_alloc["product"] + full_curve * len(grid) * (1 + product)))
    bar = _progress(progress, n_bar, "sparsity")
    dense_ppl = float(np.exp(_heldout_nll(lp, cal, np.zeros(L, np.float32))))
    _release_freed_memory()      # (the head's kernels are loaded now)
    if bar:
        bar.update(1)

    def evaluator(Q, scale):
        evaluated = {}

        def ppl_at(j):
            if j not in evaluated:
                evaluated[j] = float(np.exp(_heldout_nll(lp, cal, Q[:, j], scale)))
                if bar:
                    bar.update(1)
            return evaluated[j]
        return ppl_at, evaluated

    def choose(Q, scale):
        """(per layer the grid index, -1: dense; sparsity; thresholds; curve) of one criterion, the same
        grid point in every layer (-1 everywhere: none within the budget)."""
        ppl_at, evaluated = evaluator(Q, scale)
        j = _search(ppl_at, grid, dense_ppl, sparsity is not None, full_curve)
        curve = [(0.0, dense_ppl)] + [(float(grid[k]), evaluated[k]) for k in sorted(evaluated)]
        if j < 0:
            return np.full(L, -1), 0.0, np.zeros(L, np.float32), curve
        return np.full(L, j), float(grid[j]), Q[:, j].copy(), curve

    def allocated(Q, scale, js):
        """The same, a grid index per layer (allocate.py): costs and the budget on the drive chunks, the
        curve (dense, the allocation's mean sparsity) on the held-out ones; with full_curve the uniform
        grid's held-out curve too."""
        def tick():
            if bar:
                bar.update(1)
        costs, dense_nll = layer_costs(lp, drive, Q, scale, js, tick)
        path = greedy_path(costs, grid[js])
        at = lambda i: np.array([js[k] if k >= 0 else -1 for k in path[i][1]])         # noqa: E731
        thr = lambda jl: np.array([Q[il, j] if j >= 0 else 0.0 for il, j in enumerate(jl)], np.float32)  # noqa: E731

        def within(i):
            total, n = lp.nll(drive, thr(at(i)), scale)
            tick()
            return total / max(n, 1) <= dense_nll + np.log(PPL_BUDGET)
        jl = at(bisect_path(path, within))
        thresholds = thr(jl)
        mean = float(np.mean([grid[j] if j >= 0 else 0.0 for j in jl]))
        curve = [(0.0, dense_ppl), (mean, float(np.exp(_heldout_nll(lp, cal, thresholds, scale))))]
        tick()
        if full_curve:
            ppl_at, evaluated = evaluator(Q, scale)
            for j in range(len(grid)):
                ppl_at(j)
            curve = sorted(curve + [(float(grid[k]), evaluated[k]) for k in evaluated])
        return jl, mean, thresholds, curve

    pick = (lambda Q, scale, kind: allocated(Q, scale, levels[kind])) if allocate else \
        (lambda Q, scale, kind: choose(Q, scale))
    if act == ACT_RELU:
        jg, chosen, thresholds, curve = np.full(L, -1), 0.0, np.zeros(L, np.float32), [(0.0, dense_ppl)]
    else:
        jg, chosen, thresholds, curve = pick(q_train, None, "gate")
    jp, p_chosen, p_thresholds, p_curve = pick(qp_train, dn, "product") if product else \
        (np.full(L, -1), 0.0, None, [])
    if bar:
        bar.close()
    phases["sparsity"] = time.perf_counter() - t
    phase_peak["sparsity"] = sampler.mark() / MiB

    # ---- 2b. the output head's index ----
    t = time.perf_counter()
    hindex = None
    head_raw = f.raw(head_name)
    if r:
        bar = _progress(progress, 2, "head index")
        train_h, held_h, n_decode = calibration_states(lp, tok, cal)
        if bar:
            bar.update(1)
        hindex = build_head_index(head_raw, f.tensor(head_name).qtype, train_h, held_h, r, n_decode)
        del train_h, held_h
        if bar:
            bar.update(1)
            bar.close()
        f.release(f.tensor(head_name).offset, head_raw.nbytes)
    cal.H = None            # the final states served the head index only
    phases["head index"] = time.perf_counter() - t
    phase_peak["head index"] = sampler.mark() / MiB

    # ---- 3. predictors, frequencies, hot-first order ----
    t = time.perf_counter()
    # the dense model is done: drop its KV cache and scratch, and the source pages it read (they stay
    # in the page cache for the write), so the training threads have the room (peak RSS target)
    del model, lp
    f.release(0, f.file_size)
    _release_freed_memory()

    parked = Spill(dst.parent, owner=dst)      # the trained predictors, until written (spill.py)

    def fit_layer(il):
        name = f"blk.{il}.ffn_gate.weight"
        Wg = gate_rows(f, name)                                  # (n_ff, n_embd) f32, a block at a time
        # the basis first, before the layer's labels exist: it is the phase's peak (predictor.py)
        basis = gate_basis(cal.train(il, np.float16), Wg, max(ranks)) if trained[il] else None
        Xt, Xv = cal.train(il), cal.held_out(il)
        Yt = active_mask(Xt, Wg, float(thresholds[il]), ACT_NAMES[act])
        Yv = active_mask(Xv, Wg, float(thresholds[il]), ACT_NAMES[act])
        f.release(f.tensor(name).offset, f.tensor(name).n_bytes)
        fr = Yt.mean(axis=0).astype(np.float32)                  # (n_ff,) activation frequency
        order = np.argsort(-fr, kind="stable")                   # hot-first
        pfr, psp = None, 0.0
        if product:   # counted in phase 2 at the layer's chosen threshold (index 0: threshold 0)
            pfr = (p_count[il, jp[il] + 1] / len(Xt)).astype(np.float32)[order]
            psp = float(1.0 - p_held[il, jp[il] + 1])
        if not trained[il]:
            p = None
        elif rank is not None:
            p = train_predictor(Xt, Yt, Xv, Yv, Wg, rank=ranks[0], target_recall=target_recall, basis=basis)
        else:
            p = fit_smallest_rank(Xt, Yt, Xv, Yv, Wg, ranks=ranks, target_recall=target_recall, basis=basis)
        del basis, Xt, Xv, Yt
        _release_freed_memory()
        return fr[order], order, float(1.0 - Yv.mean()), p and _as_stored(p, order, parked), pfr, psp

    preds, orders, freq, layer_sparsity, prod_freq, prod_layer_sparsity = [], [], [], [], [], []
    bar = _progress(progress, cfg.n_layer, "predictors")
    # Layers train in parallel threads, one BLAS thread each: numpy releases the GIL in the matmuls and
    # the elementwise steps, so 2 cores train ~2x faster; each layer's result does not depend on this.
    with single_threaded_blas(), ThreadPoolExecutor(n_threads) as pool:
        for fr, order, sp, p, pfr, psp in pool.map(fit_layer, range(cfg.n_layer)):
            freq.append(fr)
            orders.append(order)
            layer_sparsity.append(sp)
            preds.append(p)
            prod_freq.append(pfr)
            prod_layer_sparsity.append(psp)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    phases["predictors"] = time.perf_counter() - t
    phase_peak["predictors"] = sampler.mark() / MiB

    # ---- 4. write ----
    t = time.perf_counter()
    n_cal_tokens = len(cal.tokens)
    cal.close()     # the spill file is anonymous: an exception before this leaves nothing on disk either
    del cal
    _release_freed_memory()
    down_q = GGMLQuantizationType[down_type]
    part_types, part_bytes = [], []
    for il in range(cfg.n_layer):
        g, u = f.tensor(f"blk.{il}.ffn_gate.weight"), f.tensor(f"blk.{il}.ffn_up.weight")
        types = (g.qtype, u.qtype, int(down_q))
        part_types += types
        part_bytes += [ff.part_bytes(q, cfg.n_embd) for q in types]
    sha = models.sha256_file(src_path)
    meta = dict(
        version=ff.FLASH_VERSION, sha=sha, types=part_types, bytes=part_bytes, act=ACT_NAMES[act],
        thresholds=thresholds, sparsity=chosen, layer_sparsity=layer_sparsity, preds=preds,
        cal_tokens=n_cal_tokens, source=source, curve=curve, head_index=hindex,
        product=dict(thresholds=p_thresholds, sparsity=p_chosen, layer_sparsity=prod_layer_sparsity,
                     curve=p_curve, down_norm=dn, freq=prod_freq) if product else None)
    # a locked temp file renamed on success: Ctrl-C or a full disk leave nothing at dst, and a converter
    # killed outright leaves a temp file that the next conversion to dst removes (atomic.py)
    with atomic_output(dst) as tmp:
        _write(f, cfg, tmp, meta, orders, freq, down_q, progress)
    parked.close()
    phases["write"] = time.perf_counter() - t
    phase_peak["write"] = sampler.mark() / MiB
    ffn_bytes = sum(f.tensor(f"blk.{il}.{p}.weight").n_bytes for il in range(cfg.n_layer)
                    for p in ("ffn_gate", "ffn_up", "ffn_down"))
    return ConvertReport(
        str(dst), chosen, curve, [float(x) for x in thresholds], layer_sparsity,
        [p.rank if p else 0 for p in preds], [p.recall if p else 0.0 for p in preds],
        [p.precision if p else 0.0 for p in preds], sum(p.n_bytes for p in preds if p), ffn_bytes,
        sum(cfg.n_ff * sum(part_bytes[3 * il:3 * il + 3]) for il in range(cfg.n_layer)),
        time.perf_counter() - t_start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, phases,
        hindex, head_raw.nbytes, p_chosen, p_curve, prod_layer_sparsity if product else [], phase_peak,
        sampler.total / MiB, [float(grid[j]) if j >= 0 else 0.0 for j in jg],
        [float(grid[j]) if j >= 0 else 0.0 for j in jp] if product else [], bool(allocate))


def _write(f, cfg, path, meta, orders, freq, down_q, progress):
    """Stream the flash GGUF: header and tensor infos first, then each tensor's data in order."""
    w = GGUFWriter(path, cfg.arch)
    w.add_custom_alignment(ff.ALIGNMENT)
    for key, value in f.meta.items():
        if key in ("general.architecture", "general.alignment"):
            continue
        vtype, itype = f.meta_types[key]
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, list(value) if isinstance(value, np.ndarray) else value, vtype,
                            sub_type=GGUFValueType(itype))
        else:
            w.add_key_value(key, value, vtype)
    L = cfg.n_layer
    preds = meta["preds"]
    w.add_uint32(ff.K_VERSION, meta["version"])
    w.add_string(ff.K_SOURCE_SHA, meta["sha"])
    w.add_array(ff.K_PARTS, list(ff.PARTS))
    w.add_key_value(ff.K_TYPES, [int(x) for x in meta["types"]], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    w.add_key_value(ff.K_BYTES, [int(x) for x in meta["bytes"]], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    w.add_string(ff.K_ACTIVATION, meta["act"])
    f32s = lambda key, xs: w.add_key_value(key, [float(x) for x in xs], GGUFValueType.ARRAY,  # noqa: E731
                                           GGUFValueType.FLOAT32)
    f32s(ff.K_THRESHOLD, meta["thresholds"])
    w.add_float32(ff.K_SPARSITY, meta["sparsity"])
    f32s(ff.K_LAYER_SPARSITY, meta["layer_sparsity"])
    # a layer without a predictor: rank 0, zeros in the other predictor keys, no predictor tensors
    w.add_key_value(ff.K_RANK, [int(p.rank) if p else 0 for p in preds], GGUFValueType.ARRAY, GGUFValueType.UINT32)
    f32s(ff.K_RECALL, [p.recall if p else 0.0 for p in preds])
    f32s(ff.K_PRECISION, [p.precision if p else 0.0 for p in preds])
    w.add_key_value(ff.K_PRED_KIND, [int(p is not None and p.kind == "abs") for p in preds], GGUFValueType.ARRAY,
                    GGUFValueType.UINT32)
    f32s(ff.K_PRED_OFFSET, [p.offset if p else 0.0 for p in preds])
    w.add_uint32(ff.K_CAL_TOKENS, meta["cal_tokens"])
    w.add_string(ff.K_CAL_SOURCE, meta["source"])
    f32s(ff.K_CURVE_S, [s for s, _ in meta["curve"]])
    f32s(ff.K_CURVE_PPL, [p for _, p in meta["curve"]])
    pr = meta["product"]
    if pr is not None:
        f32s(ff.K_PROD_THRESHOLD, pr["thresholds"])
        w.add_float32(ff.K_PROD_SPARSITY, pr["sparsity"])
        f32s(ff.K_PROD_LAYER_SPARSITY, pr["layer_sparsity"])
        f32s(ff.K_PROD_CURVE_S, [s for s, _ in pr["curve"]])
        f32s(ff.K_PROD_CURVE_PPL, [p for _, p in pr["curve"]])
    hi = meta["head_index"]
    if hi is not None:
        w.add_float32(ff.K_HI_MARGIN, hi.margin)
        w.add_float32(ff.K_HI_MARGIN_DIST, hi.margin_dist)
        w.add_uint32(ff.K_HI_HELDOUT, hi.n_heldout)
        w.add_float32(ff.K_HI_READ, hi.read_frac)
        w.add_float32(ff.K_HI_BYTES, hi.bytes_frac)

    ffn = {f"blk.{il}.{p}.weight" for il in range(L) for p in ("ffn_gate", "ffn_up", "ffn_down")}
    # the head (and so a tied embedding) is stored in the head index's row order
    head_name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    order = hi.order if hi is not None else None
    plan = []   # (producer, source tensors it reads) in file order: their pages are released once written
    for name, info in f.tensors.items():
        if name in ffn:
            continue
        if info.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.I32):
            arr = f.array(name)
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        else:
            arr = f.raw(name)
            w.add_tensor_info(name, arr.shape, np.uint8, arr.nbytes, raw_dtype=GGMLQuantizationType(info.qtype))
        if name == head_name and order is not None:
            plan.append((lambda a=arr: _RowsInOrder(a, order), [name]))
        else:
            plan.append((lambda a=arr: a, [name]))
    for il in range(L):
        bb = sum(meta["bytes"][3 * il:3 * il + 3])
        p = preds[il]
        w.add_tensor_info(ff.t_bundle(il), (cfg.n_ff, bb), np.dtype(np.int8), cfg.n_ff * bb)
        plan.append((lambda il=il: _bundle(f, cfg, il, orders[il], down_q).view(np.int8),
                     [f"blk.{il}.{p}.weight" for p in ("ffn_gate", "ffn_up", "ffn_down")]))
        w.add_tensor_info(ff.t_neuron_id(il), (cfg.n_ff,), np.dtype(np.int32), cfg.n_ff * 4)
        plan.append((lambda il=il: orders[il].astype(np.int32), []))
        w.add_tensor_info(ff.t_freq(il), (cfg.n_ff,), np.dtype(np.float32), cfg.n_ff * 4)
        plan.append((lambda il=il: freq[il], []))
        if pr is not None:   # in stored (hot-first) row order
            w.add_tensor_info(ff.t_down_norm(il), (cfg.n_ff,), np.dtype(np.float32), cfg.n_ff * 4)
            plan.append((lambda il=il: pr["down_norm"][il][orders[il]].astype(np.float32), []))
            w.add_tensor_info(ff.t_prod_freq(il), (cfg.n_ff,), np.dtype(np.float32), cfg.n_ff * 4)
            plan.append((lambda il=il: pr["freq"][il].astype(np.float32), []))
        if p is None:
            continue
        w.add_tensor_info(ff.t_pred_a(il), p.A.shape, np.dtype(np.float16), p.A.size * 2)
        plan.append((p.A.load, []))
        w.add_tensor_info(ff.t_pred_b(il), p.B.shape, np.dtype(np.float16), p.B.size * 2)
        plan.append((p.B.load, []))
        w.add_tensor_info(ff.t_pred_bias(il), p.bias.shape, np.dtype(np.float32), p.bias.size * 4)
        plan.append((lambda bias=p.bias: bias, []))
    if hi is not None:
        for name, arr in ((ff.T_HI_BASIS, hi.basis), (ff.T_HI_PREVIEW, hi.preview), (ff.T_HI_SCALE, hi.scale),
                          (ff.T_HI_ORDER, hi.order)):
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
            plan.append((lambda a=arr: a, []))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = _progress(progress, len(plan), "write")
    for produce, reads in plan:
        data = produce()
        w.write_tensor_data(data if isinstance(data, _RowsInOrder) else np.ascontiguousarray(data))
        for name in reads:
            f.release(f.tensor(name).offset, f.tensor(name).n_bytes)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    w.close()


class _RowsInOrder:
    """A tensor's rows in another order, for GGUFWriter.write_tensor_data (which takes .nbytes and
    .tofile): written ORDER_ROWS rows at a time, never as one permuted copy (Gemma 3's head: 171 MiB)."""
    ORDER_ROWS = 4096

    def __init__(self, a, order):
        self.a, self.order, self.nbytes = a, order, a.nbytes

    def tofile(self, fout):
        for i0 in range(0, len(self.order), self.ORDER_ROWS):
            np.ascontiguousarray(self.a[self.order[i0:i0 + self.ORDER_ROWS]]).tofile(fout)


def _wants_predictor(choice, max_rank, cfg, gate_type) -> bool:
    """Train and store this layer's predictor? "auto": only when a predictor of the largest rank it may
    get (A, B F16 + bias F32) is smaller than the layer's gate rows as resident (n_ff rows of the gate
    part): where it is not, the runtime holds the exact gate rows or nothing, never the predictor
    (plan.make_plan). Decided before training, so a skipped layer costs no training time."""
    if choice != "auto":
        return choice == "always"
    gate_rows = cfg.n_ff * ff.part_bytes(gate_type, cfg.n_embd)
    return predictor_bytes(cfg.n_embd, max_rank, cfg.n_ff) < gate_rows


@dataclass
class _StoredPredictor:
    """A trained predictor as the flash file stores it, its factors parked until written (spill.py)."""
    rank: int
    recall: float
    precision: float
    kind: str
    offset: float
    n_bytes: int
    A: Parked              # (n_embd, r) float16
    B: Parked              # (r, n_ff) float16, columns in the stored (hot-first) row order
    bias: np.ndarray       # (n_ff,) float32, in the stored order


def _as_stored(p, order, spill) -> _StoredPredictor:
    """p's columns in the stored (hot-first) row order, so predicted rows index bundles; A, B balanced,
    float16, parked in `spill`."""
    A, B = _balanced(p.A, p.B[:, order])
    return _StoredPredictor(p.rank, p.recall, p.precision, p.kind, p.offset, p.n_bytes,
                            spill.put(A.astype(np.float16)), spill.put(B.astype(np.float16)),
                            p.bias[order].astype(np.float32))


def _balanced(A, B):
    """(A diag(s), diag(1/s) B) with equal column/row norms: the same product, and both factors
    inside float16's range (a trained factor pair can drift to scales F16 cannot hold)."""
    na = np.linalg.norm(A, axis=0) + 1e-12                       # (r,)
    nb = np.linalg.norm(B, axis=1) + 1e-12                       # (r,)
    s = np.sqrt(nb / na).astype(np.float32)
    A, B = A * s[None, :], B / s[:, None]
    if max(np.abs(A).max(), np.abs(B).max()) >= 65504:
        raise InvalidArgumentError("predictor weights exceed float16 range even after balancing")
    return np.ascontiguousarray(A, np.float32), np.ascontiguousarray(B, np.float32)


def _bundle(f, cfg, il, order, down_q) -> np.ndarray:
    """(n_ff, bundle_bytes) uint8: row i = gate[order[i]] | up[order[i]] | requantized down[:, order[i]]."""
    gate = f.raw(f"blk.{il}.ffn_gate.weight")                     # (n_ff, gate_bytes)
    up = f.raw(f"blk.{il}.ffn_up.weight")                         # (n_ff, up_bytes)
    down_cols = np.empty((cfg.n_ff, cfg.n_embd), np.float32)      # (n_ff, n_embd): down's columns, stored order
    for r0 in range(0, cfg.n_embd, NEURON_BLOCK):
        D = dequant_rows(f, f"blk.{il}.ffn_down.weight", r0, r0 + NEURON_BLOCK)   # (<= block, n_ff)
        down_cols[:, r0:r0 + len(D)] = D.T[order]
    g, u = gate.shape[1], up.shape[1]
    out = np.empty((cfg.n_ff, g + u + ff.part_bytes(int(down_q), cfg.n_embd)), np.uint8)
    out[:, :g] = gate[order]
    out[:, g:g + u] = up[order]
    for r0 in range(0, cfg.n_ff, NEURON_BLOCK):   # quantized a block of rows at a time: gguf.quants'
        rows = down_cols[r0:r0 + NEURON_BLOCK]    # temporaries are a few times what they quantize
        if down_q == GGMLQuantizationType.F32:
            dq = rows.view(np.uint8)
        elif down_q == GGMLQuantizationType.F16:
            dq = rows.astype(np.float16).view(np.uint8)
        else:
            dq = quants.quantize(rows, down_q)                    # (<= block, down_bytes)
        out[r0:r0 + len(rows), g + u:] = dq.reshape(len(rows), -1)
    return out
