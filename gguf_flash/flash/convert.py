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
from gguf import GGMLQuantizationType

from .. import models
from ..atomic import atomic_output
from ..config import ACT_GELU_TANH, ACT_RELU, ACT_SILU, config_from_gguf
from ..errors import InvalidArgumentError
from ..gguf_file import GGUFFile
from .. import firstrun
from ..model import Model
from ..tokenizer import tokenizer_from_gguf
from . import format as ff
from .allocate import bisect_path, greedy_path, layer_costs
from .budget import PeakSampler, parse_size
from .calibrate import calibrate, read_calibration_text
from .head_build import build_head_index, calibration_states, head_rows, index_rank
from .convert_ram import convert_ram
from .convert_stats import SparsityStats, gate_rows, release_freed_memory
from .convert_write import as_stored, progress_bar, write_flash
from .down_cols import down_part_type, stored_order
from .layerwise import LayerPass
from .plan import MiB
from .quantile import quantiles
from .predictor import (DEFAULT_RANKS, single_threaded_blas, active_mask, fit_smallest_rank,
                        gate_basis, predictor_bytes, train_predictor)
from .spill import Spill

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
DOWN_TYPES = ("source", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32")
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
    keep_sparsity: float = 0.0      # the gate rows' per-token top-k rule's (0: not stored)
    keep_curve: list = field(default_factory=list)   # [(sparsity, held-out ppl)] of that rule
    prod_keep_sparsity: float = 0.0  # the product's per-token top-k rule's (0: not stored)
    prod_keep_curve: list = field(default_factory=list)


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


def _search_topk(ppl_at, grid, start: int, dense_ppl, full_curve: bool) -> int:
    """The largest grid index >= start whose held-out perplexity under the per-token top-k rule stays
    within PPL_BUDGET (-1: none): the rule is kept only where it beats the threshold's own choice, so
    the points are tried upward from the one past it and the search stops at the first over budget."""
    best = -1
    for j in range(start, len(grid)):
        if ppl_at(j) > dense_ppl * PPL_BUDGET:
            break
        best = j
    if full_curve:
        for j in range(len(grid)):
            ppl_at(j)
    return best


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
    name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    head_rows(f.raw(name), f.tensor(name).qtype)     # the head index's passes over the head's rows
    quantiles(np.zeros(4, np.float32), [0.5])        # the sparsity statistics' counting pass
    return model.w.ts


def _compile_out_of_process(f, progress: bool) -> None:
    """Compile the kernels in a child process first (firstrun.ensure_compiled): on a fresh clone LLVM's
    compiling memory would add to the converter's own peak RSS (802 vs 579 MiB on SmolLM2). Once they
    are cached this costs a marker's lookup."""
    from ..model import Weights
    firstrun.ensure_compiled(f.path, "convert", Weights(f, config_from_gguf(f)).ts, progress=progress)


def convert(src, dst, *, calib=None, calib_tokens: int = 4096, sparsity: float | None = None,
            rank: int | None = None, down_type: str = "source", force: bool = False,
            target_recall: float = 0.95, full_curve: bool = False, predictor: str = "auto",
            head_index: bool = True, head_index_rank: int | None = None, product: bool = True,
            allocate: bool = False, max_ram=None, progress: bool = False, topk: bool = True,
            topk_sparsity: float | None = None) -> ConvertReport:
    """Write the flash GGUF of `src` to `dst` (see the module docstring). full_curve evaluates the
    held-out perplexity at every grid sparsity (the default bisects the grid: 5 evaluations, not 18).
    predictor: "auto" (a layer's predictor only where it is smaller than its gate rows), "always",
    "never". product: also store the product criterion (gated activations; the product selector).
    A given `sparsity` applies to both criteria, in every layer. allocate: a sparsity per layer instead
    (allocate.py: greedy on the loss of training chunks, judged on the held-out ones; slower, see
    docs/design.md). max_ram ("1.5G", bytes): refused before the model is read
    when below the floor convert_ram.py estimates from the model's shape; it sets the training threads.
    topk: also try each criterion's per-token top-k rule above its threshold's choice (format.K_GATE_KEEP,
    K_PROD_KEEP); topk_sparsity: store both rules at this sparsity (no search). down_type: "source" (each
    down column in the source's own codes where its type allows, down_cols.py) or the ggml type name to
    re-quantize the columns to."""
    args = dict(locals())
    sampler = PeakSampler()
    try:
        return _convert(sampler, **args)
    finally:
        sampler.close()


def _convert(sampler, src, dst, *, calib, calib_tokens, sparsity, rank, down_type, force, target_recall, full_curve,
             predictor, head_index, head_index_rank, product, allocate, max_ram, progress, topk,
             topk_sparsity) -> ConvertReport:
    t_start = time.perf_counter()
    src_path = models.resolve(src, progress)
    dst = Path(dst)
    if dst.exists() and not force:
        raise InvalidArgumentError(f"{dst}: exists (use --force to overwrite)")
    if down_type not in DOWN_TYPES:
        raise InvalidArgumentError(f"--down-type {down_type}: choose one of {', '.join(DOWN_TYPES)}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise InvalidArgumentError(f"--sparsity must be in [0, 1), got {sparsity}")
    if topk_sparsity is not None and not 0.0 < topk_sparsity < 1.0:
        raise InvalidArgumentError(f"--topk-sparsity must be in (0, 1), got {topk_sparsity}")
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
    stats = SparsityStats(f, cfg, grid, product)
    lp = LayerPass(model)
    bar = progress_bar(progress, cfg.n_layer, "calibrate")
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
    bar = progress_bar(progress, n_bar, "sparsity")
    dense_ppl = float(np.exp(_heldout_nll(lp, cal, np.zeros(L, np.float32))))
    release_freed_memory()      # (the head's kernels are loaded now)
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
    # each criterion's per-token top-k rule (nn.topk_threshold, product_topk_threshold): each token keeps
    # its own largest scores; stored where it keeps more sparsity within the budget than the threshold's
    def topk_rule(scale, j_threshold):
        """(keep per layer or None, its sparsity, its curve): the criterion's per-token top-k rule."""
        kgrid = grid if topk_sparsity is None else np.array([topk_sparsity])
        keeps = [max(1, cfg.n_ff - int(round(x * cfg.n_ff))) for x in kgrid]
        ppl_at, evaluated = evaluator(np.array([[-float(k) for k in keeps]] * L, np.float32), scale)
        if topk_sparsity is None:
            jk = _search_topk(ppl_at, kgrid, j_threshold + 1, dense_ppl, full_curve)
        else:
            ppl_at(0)       # the forced point, evaluated for the curve
            jk = 0
        kcurve = [(0.0, dense_ppl)] + [(float(kgrid[k]), evaluated[k]) for k in sorted(evaluated)]
        return ([keeps[jk]] * L, 1.0 - keeps[jk] / cfg.n_ff, kcurve) if jk >= 0 else (None, 0.0, kcurve)

    try_topk = act != ACT_RELU and not allocate and (topk_sparsity is not None or (topk and sparsity is None))
    keep, keep_chosen, keep_curve = topk_rule(None, int(jg[0])) if try_topk else (None, 0.0, [])
    p_keep, p_keep_chosen, p_keep_curve = topk_rule(dn, int(jp[0])) if try_topk and product else (None, 0.0, [])
    if bar:
        bar.close()
    phases["sparsity"] = time.perf_counter() - t
    phase_peak["sparsity"] = sampler.mark() / MiB

    # ---- 2b. the output head's index ----
    t = time.perf_counter()
    hindex = None
    head_raw = f.raw(head_name)
    if r:
        bar = progress_bar(progress, 2, "head index")
        train_h, held_h, n_decode = calibration_states(lp, tok, cal)
        if bar:
            bar.update(1)
        hindex = build_head_index(head_raw, f.tensor(head_name).qtype, train_h, held_h, r, n_decode,
                                  release=lambda: f.release_tensor(head_name))
        del train_h, held_h
        if bar:
            bar.update(1)
            bar.close()
        f.release_tensor(head_name)
    cal.H = None            # the final states served the head index only
    phases["head index"] = time.perf_counter() - t
    phase_peak["head index"] = sampler.mark() / MiB

    # ---- 3. predictors, frequencies, hot-first order ----
    t = time.perf_counter()
    # the dense model is done: drop its KV cache and scratch, and the source pages it read (they stay
    # in the page cache for the write), so the training threads have the room (peak RSS target)
    del model, lp
    f.release(0, f.file_size)
    release_freed_memory()

    parked = Spill(dst.parent, owner=dst)      # the trained predictors, until written (spill.py)

    def fit_layer(il):
        name = f"blk.{il}.ffn_gate.weight"
        Wg = gate_rows(f, name)                                  # (n_ff, n_embd) f32, a block at a time
        # the basis first, before the layer's labels exist: it is the phase's peak (predictor.py)
        basis = gate_basis(cal.train(il, np.float16), Wg, max(ranks)) if trained[il] else None
        Xt, Xv = cal.train(il), cal.held_out(il)
        Yt = active_mask(Xt, Wg, float(thresholds[il]), ACT_NAMES[act])
        Yv = active_mask(Xv, Wg, float(thresholds[il]), ACT_NAMES[act])
        f.release_tensor(name)
        fr = Yt.mean(axis=0).astype(np.float32)                  # (n_ff,) activation frequency
        # hot-first (column down parts: in pairs of one source block, down_cols.stored_order)
        order = stored_order(fr, down_part_type(f.tensor(f"blk.{il}.ffn_down.weight").qtype, down_type))
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
        release_freed_memory()
        return fr[order], order, float(1.0 - Yv.mean()), p and as_stored(p, order, parked), pfr, psp

    preds, orders, freq, layer_sparsity, prod_freq, prod_layer_sparsity = [], [], [], [], [], []
    bar = progress_bar(progress, cfg.n_layer, "predictors")
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
    release_freed_memory()
    part_types, part_bytes = [], []
    for il in range(cfg.n_layer):
        g, u = f.tensor(f"blk.{il}.ffn_gate.weight"), f.tensor(f"blk.{il}.ffn_up.weight")
        types = (g.qtype, u.qtype, down_part_type(f.tensor(f"blk.{il}.ffn_down.weight").qtype, down_type))
        part_types += types
        part_bytes += [ff.part_bytes(q, cfg.n_embd) for q in types]
    sha = models.sha256_file(src_path)
    meta = dict(
        version=ff.FLASH_VERSION, sha=sha, types=part_types, bytes=part_bytes, act=ACT_NAMES[act],
        thresholds=thresholds, sparsity=chosen, layer_sparsity=layer_sparsity, preds=preds,
        cal_tokens=n_cal_tokens, source=source, curve=curve, head_index=hindex,
        product=dict(thresholds=p_thresholds, sparsity=p_chosen, layer_sparsity=prod_layer_sparsity,
                     curve=p_curve, down_norm=dn, freq=prod_freq) if product else None,
        topk=dict(keep=keep, sparsity=keep_chosen, curve=keep_curve) if keep is not None else None,
        prod_topk=dict(keep=p_keep, sparsity=p_keep_chosen, curve=p_keep_curve) if p_keep is not None else None)
    # a locked temp file renamed on success: Ctrl-C or a full disk leave nothing at dst, and a converter
    # killed outright leaves a temp file that the next conversion to dst removes (atomic.py)
    with atomic_output(dst) as tmp:
        write_flash(f, cfg, tmp, meta, orders, freq, progress)
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
        [float(grid[j]) if j >= 0 else 0.0 for j in jp] if product else [], bool(allocate), keep_chosen,
        keep_curve, p_keep_chosen, p_keep_curve)


def _wants_predictor(choice, max_rank, cfg, gate_type) -> bool:
    """Train and store this layer's predictor? "auto": only when a predictor of the largest rank it may
    get (A, B F16 + bias F32) is smaller than the layer's gate rows as resident (n_ff rows of the gate
    part): where it is not, the runtime holds the exact gate rows or nothing, never the predictor
    (plan.make_plan). Decided before training, so a skipped layer costs no training time."""
    if choice != "auto":
        return choice == "always"
    gate_rows = cfg.n_ff * ff.part_bytes(gate_type, cfg.n_embd)
    return predictor_bytes(cfg.n_embd, max_rank, cfg.n_ff) < gate_rows
