"""FlashModel: the forward pass of a flash GGUF under a RAM cap (DESIGN.md sections 1, 5, 6, 10).

Per token and layer: attention (resident weights) -> FFN input -> the selector chooses neurons
(flash/selector.py) -> the FFN loader computes them over the window's slots and, for what the window
cannot hold, over a staging buffer (flash/ffn.py) -> residual. The head and the token embedding are
resident or read on demand (flash/head.py). What is resident is the plan's choice (flash/plan.py), made
from the runtime's measured RSS, the parts' sizes and the disk's throughput.
Modes: "flash" (the product), "naive" (every FFN bundle read from the file every token, the paper's
baseline), "dense" (every bundle resident, every neuron computed: the identity with the source model
up to the down re-quantization). Same interface as model.Model: forward, prefill, head, cfg, n_ctx.
"""

from __future__ import annotations

import logging
import time

import numpy as np

import numba

from ..config import config_from_gguf
from ..errors import ContextOverflowError, GGUFFormatError, InvalidArgumentError, RamCapError
from .. import firstrun
from ..kernels import dispatch, flashstep, forward as fw, nn, release_compiler_pages, sparse
from ..kernels.quant_basic import MM_ROWS
from ..kernels.quant_cols import COLS_TYPES
from ..model import RunState, Weights, set_threads
from . import budget
from .ffn import NO_TABLES, FFNLoader, _split
from .selector import held_selector_args, selector_args
from . import format as ff
from .format import read_flash
from .head import HeadOrder, OutputHead, TokenEmbedding
from .head_index import EXACT, HeadNeed, IndexedHead
from .pinned import pin
from .plan import HEADROOM, mib
from .prefill import CHUNK, ChunkBuffers, ChunkPrefill
from .selector import Selector
from .sizing import choose_plan, disk_settings
from .stats import TokenStats  # noqa: F401  (the per-token statistics; re-exported)
from .store import BundleStore
from .window import KEEP_WHILE_ROOM, Window

log = logging.getLogger(__name__)
MODES = ("flash", "naive", "dense")
SELECTORS = ("auto", "predictor", "gate", "product", "bundle")
HEADS = ("auto", "index", "exact")   # auto: the plan may use the file's head index; index: always (the
                                     # head streamed); exact: never


def compile_out_of_process(f, kv_type: str = "f16", logit_rows: int = 0, progress: bool = False) -> None:
    """On a first run, compile the runtime's kernels in a child process (firstrun.ensure_compiled)
    before the plan measures this process's RSS: in-process, LLVM's compiling memory made the runtime
    look 734 MiB instead of ~210 and the first `run --max-ram 360M` was refused. The type set is the
    file's attention, head and embedding weights'; the bundle parts' types name the marker's extra. Once
    they are cached this costs a marker's lookup."""
    c = config_from_gguf(f)
    info = read_flash(f, c)
    tset = Weights(f, c, ffn=False).ts
    # the row kernels are specialized on the parts' own types (dispatch.part_type_sets): they name the marker
    parts = ".".join("_".join(names) for names in dispatch.part_type_names(part_tsets(info)))
    extra = ("index-" if info.head_index is not None else "") + parts
    firstrun.ensure_compiled(f.path, "flash", tset, kv_type, logit_rows, progress, extra=extra)


def preload_kernels(f, cfg=None, info=None, kv_type: str = "f16", logit_rows: int = 0, held: bool = True) -> tuple:
    """Load every compiled function the token loop uses (from numba's cache) on tiny inputs, then hand
    LLVM's pages back (kernels.release_compiler_pages). held=False leaves out flashstep.layers_held (5 MiB
    of machine code, resident like the rest: a run under a cap never loads it, the first-run child
    compiles it). Called before the tokenizer and the model's own
    buffers exist, LLVM's ~70 MiB peak comes while the process is small; FlashModel calls it again (then it
    loads nothing) and measures its runtime. Nothing compiles or loads under the cap afterwards (a cache
    load would touch LLVM again: ~50 MiB)."""
    c = cfg or config_from_gguf(f)
    info = info or read_flash(f, c)
    w, s = Weights(f, c, ffn=False), RunState(c, 16, n_ubatch=1, kv_type=kv_type)
    l0 = info.layers[0]
    ffn_out = np.zeros(c.n_embd, np.float32)
    fw.embed(s.x, w.blob, w.embd, 0, w.fp[fw.FP_EMBD_SCALE], w.ts)
    nn.rope_cos_sin(s.cos[0], s.sin[0], 0, w.inv_freq[0])
    nn.rmsnorm(s.xb, s.x, w.norms[0, fw.NORM_FFN], w.fp[fw.FP_EPS])
    dispatch.quantize_x(s.xq_embd, s.xb)
    one = np.zeros((1, l0.bundle_bytes), np.uint8)
    idx = np.zeros(c.n_ff, np.int32)
    g = np.zeros(c.n_ff, np.float32)
    partial = np.zeros((2, c.n_embd), np.float32)
    hsum = np.zeros((2, 1), np.float32)
    pts = part_tsets(info)
    dt = NO_TABLES   # the kernels' argument types only (every layer's tables have them; no copy here)
    sparse.sparse_ffn_range(partial, hsum, one, idx, one, idx, idx, 0, 0, 0, g, sparse.KNOWN_NONE, s.xb, s.xq_embd,
                            np.array(l0.types, np.int64), np.array(np.cumsum((0,) + l0.part_bytes), np.int64),
                            dt, c.activation, np.float32(0), pts)
    # a decode step's two calls (kernels/flashstep.py), with the selector's stand-ins (every kind has
    # their types) and no row chosen
    none = np.zeros(0, np.int32)
    flashstep.layer_select(s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.k_cache, s.v_cache, s.cos, s.sin,
                           s.xq_embd, s.xq_q, w.blob, w.mats, w.norms, w.qk_norms, w.biases, w.swa, w.ip, w.fp, 0,
                           *selector_args(None, 0), s.hg, s.hu, none, g, idx, idx, idx, 0, 0, w.ts, pts)
    flashstep.layer_ffn(s.x, ffn_out, partial, hsum, True, one, idx, one, idx, none, 0, 0, g, sparse.KNOWN_NONE, s.xb,
                        s.xq_embd, np.array(l0.types, np.int64), np.array(np.cumsum((0,) + l0.part_bytes), np.int64),
                        dt, c.activation, np.float32(0), w.norms[0, fw.NORM_POST_FFW], w.fp[fw.FP_EPS], int(c.post_norms), pts)
    # every layer in one call (a token that reads nothing): loaded, but run over no layer (ip's layer
    # count 0), so no attention weight is paged in here to be counted in the runtime's RSS (+19 MiB)
    if held:
        L, ip0 = c.n_layer, w.ip.copy()
        ip0[fw.IP_N_LAYER] = 0
        flashstep.layers_held(s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.k_cache, s.v_cache, s.cos, s.sin,
                              s.xq_embd, s.xq_q, w.blob, w.mats, w.norms, w.qk_norms, w.biases, w.swa, ip0, w.fp,
                              *held_selector_args(None, L), s.hg, s.hu, none, g, idx, idx, ffn_out, partial, hsum, one,
                              idx, ((one, idx, idx, dt),) * L, np.zeros(L, np.int64), np.zeros((L, 3), np.int64),
                              np.zeros((L, 4), np.int64), np.zeros(L, np.float32), 0, 0, 0, w.ts, pts)
    # the prompt chunk's kernels (flash/prefill.py), on one token
    pre = ChunkBuffers(c, s.k_cache.shape[1], 2, True, chunk=1)
    cts = chunk_tset(info)
    fw.attention_batch_layer(pre.X, pre.XB, pre.XR, pre.Q, pre.K, pre.V, pre.ATT, pre.ATR, pre.scores,
                             s.k_cache, s.v_cache, pre.cos, pre.sin, w.blob, w.mats, w.norms, w.qk_norms,
                             w.biases, w.swa, w.ip, w.fp, 0, 0, w.ts)
    fw.rows_rmsnorm(pre.XB, pre.X, w.norms[0, fw.NORM_FFN], w.fp[fw.FP_EPS])
    fw.rows_round_q8(pre.XR, pre.XB)
    fw.rows_residual(pre.X, pre.XB, w.norms[0, fw.NORM_POST_FFW], w.fp[fw.FP_EPS], 0)
    sparse.mask_by_gate(pre.MK, pre.HG, c.activation, 0.0, pre.HU[0])
    sparse.mask_by_product(pre.MK, pre.HG, pre.HU, g, c.activation, 0.0, pre.HU[0])
    sparse.mask_by_logit(pre.MK[0], pre.HG[0], 0.0, True)
    sparse.union_rows(idx, pre.MK)
    sparse.gate_chunk(np.zeros((1, MM_ROWS), np.float32), np.zeros((MM_ROWS, l0.part_bytes[0]), np.uint8), int(l0.types[0]),
                      pre.XB, cts)
    sparse.sparse_ffn_chunk(pre.PART, pre.DEC, pre.H, one, idx, one, idx, idx, 0, 0, pre.MK, pre.HG, sparse.KNOWN_NONE,
                            pre.XB, pre.XR, np.array(l0.types, np.int64),
                            np.array(np.cumsum((0,) + l0.part_bytes), np.int64), dt, c.activation, np.float32(0),
                            cts, pts[3])
    sparse.sum_parts_chunk(pre.X, pre.PART)
    _split(idx, idx, idx, 0, idx, 1)
    # the factors as Selector holds them (uint16 copies), the bias a read-only view of the map
    bias = l0.pred_bias[:1] if l0.pred_bias is not None else np.zeros(1, np.float32)
    sparse.predictor_logits(s.hg[:1], np.zeros(1, np.float32), s.xb, np.zeros((c.n_embd, 1), np.uint16),
                            np.zeros((1, 1), np.uint16), bias)
    head = w.output.copy()
    head[1] = 1
    dispatch.matvec(s.logits[:1], w.blob, head, s.xb, s.xq_embd, w.ts)
    if logit_rows > 1:   # prompt logits r rows at a time (perplexity): a matrix product over the head
        dispatch.matmat(np.zeros((1, 1), np.float32), w.blob, head, pre.XB, w.ts)
        fw.rows_rmsnorm(pre.XB, pre.X, w.output_norm, w.fp[fw.FP_EPS])
    fw.output_head(s.logits[:1], s.x, s.xb, s.xq_embd, w.blob, head, w.output_norm, w.fp[fw.FP_EPS], w.ts)
    nn.rmsnorm(s.xb, s.x, w.output_norm, w.fp[fw.FP_EPS])
    f.release(int(head[0]), int(head[2]))
    if info.head_index is not None:
        _preload_head_index(s, w, int(head[3]))
    if info.head_order is not None:     # logits from the head's stored order to token order
        from ..kernels import headidx
        headidx.gather(s.logits[:2], np.zeros(2, np.float32), np.zeros(2, np.int32))
    win = Window(4, 8, 4, 1)
    win.update(np.arange(2, dtype=np.int32), 0)
    win.update(np.arange(2, 4, dtype=np.int32), 5)
    win.shrink(2)
    # the store's range planner and row copier (strided and not), on two rows of the real file
    with BundleStore(f.path, l0.bundle_offset, l0.bundle_bytes, 2, n_threads=1) as st:
        two = np.arange(2, dtype=np.int32)
        st.read_rows(two, np.zeros((2, l0.bundle_bytes), np.uint8), two)
        st.select(l0.bundle_offset, l0.part_bytes[0], 2, stride=l0.bundle_bytes)
        st.read_rows(two, np.zeros((2, l0.part_bytes[0]), np.uint8), two)
    release_compiler_pages()
    return w.ts


def _preload_head_index(s, w, qt) -> None:
    """The head index's kernels (flash/head_index.py), with its argument types, on one row."""
    from ..kernels import headidx
    from .head_index import _copy
    d = s.xb.shape[0]
    v = s.logits[:2]
    ids, mark = np.zeros(2, np.int32), np.zeros(2, np.uint8)
    headidx.preview_logits(v, np.zeros(1, np.float32), np.zeros(1, np.float32), s.xb,
                           _copy(np.zeros((1, d), np.float32)), _copy(np.zeros((2, 1), np.int8)),
                           _copy(np.zeros(2, np.uint16)))
    n = headidx.top_rows(ids, np.zeros(1, np.int32), v)
    headidx.rows_above(ids, v, np.float32(0), mark)
    headidx.kth_largest(v, ids[:n], 1)
    rows = np.zeros((1, int(w.output[2])), np.uint8)
    headidx.exact_rows(v, mark, ids[:1], rows, qt, s.xb, s.xq_embd, w.ts)
    headidx.clear_marks(mark, ids[:1])


def check_request(mode: str, selector: str, head: str) -> None:
    """The run's options, before anything is read: InvalidArgumentError naming the bad one."""
    if mode not in MODES:
        raise InvalidArgumentError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if selector not in SELECTORS:
        raise InvalidArgumentError(f"--selector {selector}: choose one of {', '.join(SELECTORS)}")
    if head not in HEADS:
        raise InvalidArgumentError(f"--head {head}: choose one of {', '.join(HEADS)}")


def check_file(f, c, info, mode: str, selector: str) -> None:
    """What the options ask of the file (a predictor in every layer, the product criterion): one-line
    errors naming the file. The bundles' types were checked by read_flash."""
    if mode == "flash" and selector == "predictor" and not info.has_predictors:
        have = sum(l.pred_a is not None for l in info.layers)
        raise InvalidArgumentError(f"{f.path}: this file has no predictors"
                                   f"{f' (only {have} of {c.n_layer} layers have one)' if have else ''}: "
                                   f"convert with --predictor always")
    if mode == "flash" and selector == "product" and not info.has_product:
        raise InvalidArgumentError(f"{f.path}: this file has no product criterion (convert it again with "
                                   f"this version; models with ReLU have none)")


class FlashModel:
    def __init__(self, f, *, max_ram=None, mode: str = "flash", selector: str = "auto",
                 n_ctx: int | None = None, n_threads: int | None = None, cold: bool = False,
                 window_k: int | None = None, io_threads: int = 4, kv_type: str = "f16", prefill_chunk: int | None = None,
                 logit_rows: int = 0, head: str = "auto"):
        check_request(mode, selector, head)
        set_threads(n_threads)
        self.file, self.mode = f, mode
        self.cfg = c = config_from_gguf(f)
        self.info = info = read_flash(f, c)
        check_file(f, c, info, mode, selector)
        self.n_ctx = int(n_ctx) if n_ctx else min(1024 if max_ram else 4096, c.n_ctx_train)
        self.w = Weights(f, c, ffn=False)
        self.st = RunState(c, self.n_ctx, n_ubatch=1, kv_type=kv_type)   # tokens one at a time: no prompt batch buffers
        self.cap = budget.parse_size(max_ram) if max_ram is not None else None
        disk = disk_settings(f, info, io_threads)

        # ---- kernels loaded (compiled in a child on a first run), LLVM released, the runtime measured ----
        compile_out_of_process(f, kv_type, logit_rows)
        # without a cap, a token that reads nothing is one call (layers_held); under one its 5 MiB of
        # machine code would come off the window, and such a token is rare there
        self._held_loaded = self.cap is None
        preload_kernels(f, c, info, kv_type, logit_rows, held=self._held_loaded)
        baseline = budget.rss()

        # ---- the plan (refuses an impossible cap before anything large is loaded) ----
        # at most 8 MiB of prompt logits (SmolLM2: 32 rows, Gemma 3's 262,144-token vocabulary: 8)
        self.logit_rows = max(1, min(int(logit_rows), CHUNK, (8 << 20) // (4 * c.n_vocab)))
        self.plan, self.prefill_chunk = choose_plan(f, c, info, self.w, self.st, self.cap, baseline, mode, selector,
                                                    head, disk, self.logit_rows, self.n_ctx, prefill_chunk)
        self.selector = self.plan.selector
        log.info("RAM plan: %s", self.plan.describe())

        # ---- the pieces ----
        L, hi, order = c.n_layer, info.head_index, info.head_order
        self.store = BundleStore(f.path, info.layers[0].bundle_offset, info.layers[0].bundle_bytes, c.n_ff,
                                 cold=cold, n_threads=disk.io_threads, gap_bytes=disk.gap, stat=f.stat,
                                 max_range=disk.max_range)
        cts = chunk_tset(info)   # the prompt chunk's kernels' type set (the selector's and the FFN's)
        self.select = Selector(self.selector, info.layers, self.store, c.n_ff, c.activation, cts)
        if self.selector == "predictor":   # the selector copied the factors: drop the map's pages of them
            for il in range(L):
                for name in (ff.t_pred_a(il), ff.t_pred_b(il)):
                    f.release_tensor(name)
        # the FFN kernels' own gate rule; with the gate rows' top-k rule the selector has chosen the rows
        # already, so the kernels compute every chosen row (0: |act| > 0 holds for each of them)
        self.thresholds = np.array([0.0 if self.selector == "gate" and l.keep else l.threshold
                                    for l in info.layers], np.float32) if mode == "flash" else np.zeros(L, np.float32)
        self.ptsets = part_tsets(info)
        self.ffn = FFNLoader(self.store, info.layers, self.plan, c.n_ff, c.n_embd, numba.get_num_threads(),
                             KEEP_WHILE_ROOM if window_k is None else window_k, cts, self.ptsets,
                             huge=self.cap is None)
        ff.release_down_tables(f, L)   # copied by the loader: the map's pages would be held twice
        # what stays resident is copied out of the file map (flash/pinned.py: a file truncated under the
        # model is then a read error naming it, not SIGBUS); streamed parts keep their file offsets
        embd_resident = self.plan.embedding != "on demand (a row per token)"
        if self.w.embd is self.w.output:
            self.w.embd = self.w.output.copy()
        keep = [self.w.mats[il, j] for il in range(L) for j in range(4)]
        keep += ([] if self.plan.head_streamed else [self.w.output]) + ([self.w.embd] if embd_resident else [])
        self.w.blob = pin(f, keep)
        self.head_order = HeadOrder(order) if order is not None else None
        self.out_head = OutputHead(self.w, self.st, self.store, self.plan.head_streamed, self.head_order)
        self.indexed = IndexedHead(self.w, self.st, hi, self.out_head) if self.plan.head_indexed else None
        if hi is not None:   # copied (or unused): the map's pages of it leave this process's RSS
            ff.release_head_index(f)
        self.head_need = EXACT   # what the next token's sampler needs (set_head_need); exact by default
        self.embed = TokenEmbedding(self.w, self.store, embd_resident, self.head_order if c.tied_output else None)
        if mode == "dense":
            for il in range(L):
                self.ffn.load_all(il)
        self._step, self._post = self._step_arguments()
        self.stats: list = []         # TokenStats of every forward() call (decode tokens)
        self.prompt_stats: list = []  # ChunkStats of every prompt chunk
        self.t = 0   # token counter for the window
        self.chunked = ChunkPrefill(self, self.prefill_chunk)

    def _step_arguments(self):
        """Each layer's arguments of the decode step's two compiled calls (kernels/flashstep.py):
        layer_select's (all but pos and the window's capacity, which the watchdog may lower) and the
        residual's (post-norm weight, eps, post_norm). The selector's thresholds are read here, once."""
        c, s, w, sel, ffn = self.cfg, self.st, self.w, self.select, self.ffn
        self._state = (s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.k_cache, s.v_cache, s.cos, s.sin, s.xq_embd,
                       s.xq_q, w.blob, w.mats, w.norms, w.qk_norms, w.biases, w.swa, w.ip, w.fp)
        self._rows = (s.hg, sel.hu if self.selector == "product" else s.hu, sel.active, sel.gvals)
        self._sel_held = held_selector_args(sel, c.n_layer)   # every layer's, for layers_held
        self._held_caps = np.zeros(c.n_layer, np.int64)   # (n_layer,) int64 layers_held's capacities
        self._held_args = None   # its windows tuple (_held), rebuilt when a window reallocates
        self._held_tuple = None  # all of its arguments but il0, pos, t and the type sets, with that tuple
        step = [self._state + (il,) + sel.step_args(il) + self._rows
                + (ffn.windows[il].neuron_slot if ffn.windows[il] else ffn.no_slot, ffn.win_rows, ffn.ovf_pos)
                for il in range(c.n_layer)]
        eps = w.fp[fw.FP_EPS]     # float32 and int: the types the compiled step passes (one specialization)
        post = [(w.norms[il, fw.NORM_POST_FFW], eps, int(c.post_norms)) for il in range(c.n_layer)]
        return step, post

    def _held(self):
        """layers_held's arguments but il0, pos, t and the type sets, when a token's layers can run in one
        call: no cap (under one layers_held is not loaded), a window per layer, each keeping its rows
        while it has room (window.KEEP_WHILE_ROOM, so a layer that reads nothing evicts nothing); else
        None. A window that holds every row while the selector takes them all (bundle rows, dense mode)
        gets capacity -1: nothing to split or look for. Built once and reused while no window has
        reallocated its slots; the capacities are written into one array in place (every token asks)."""
        ffn, wins = self.ffn, self.ffn.windows
        if not self._held_loaded:
            return None
        every = self._sel_held[0] == flashstep.SEL_NONE
        caps, cached, n_ff = self._held_caps, self._held_args, self.cfg.n_ff
        for il, win in enumerate(wins):
            if win is None or win.k != KEEP_WHILE_ROOM or self.t >= win.k:
                return None
            caps[il] = -1 if every and win.n_used == n_ff else win.capacity
            if cached is not None and cached[il][0] is not win.slots:
                cached = None
        if cached is None:
            cached = tuple((win.slots, win.neuron_slot, win.last_active, ffn.dtabs[il]) for il, win in enumerate(wins))
            self._held_args = cached
            self._held_tuple = (self._state + self._sel_held + self._rows
                                + (ffn.win_rows, ffn.ovf_pos, ffn.out, ffn.partial, ffn.hsum, ffn.staging,
                                   ffn.stage_map, cached, caps, ffn.types, ffn.offs, self.thresholds))
        return self._held_tuple

    @property
    def windows(self):
        return [w for w in self.ffn.windows if w is not None]

    # ---- forward ----
    def _check_pos(self, pos, n=1):
        if pos < 0 or pos + n > self.n_ctx:
            raise ContextOverflowError(f"{self.file.path}: {pos + n} tokens do not fit the context of "
                                       f"{self.n_ctx} (use -c to enlarge it)")

    def forward(self, token: int, pos: int, logits: bool = True) -> np.ndarray:
        """Logits (n_vocab,) of `token` at `pos` (a view reused next call). logits=False skips the
        output head (a prompt token whose logits nobody reads: the whole head is 30-171 MiB)."""
        self._check_pos(pos)
        if not 0 <= token < self.cfg.n_vocab:
            raise GGUFFormatError(f"{self.file.path}: token id {token} out of range")
        self.store.check_unchanged()
        c, w, s = self.cfg, self.w, self.st
        ts = TokenStats()
        t_all = time.perf_counter()
        self.embed(s.x, token, ts)
        nn.rope_cos_sin(s.cos[0], s.sin[0], pos, w.inv_freq[0])
        nn.rope_cos_sin(s.cos[1], s.sin[1], pos, w.inv_freq[1])
        eps = w.fp[fw.FP_EPS]
        sel, ffn, wins = self.select, self.ffn, self.ffn.windows
        held = self._held()
        il = 0
        while il < c.n_layer:
            if held is not None:   # the layers up to one with rows to read, in one call
                il, n, known, nw, no, total = flashstep.layers_held(*held, il, pos, self.t, w.ts, self.ptsets)
                ts.predicted += total
                ts.active += total
                if il == c.n_layer:
                    break
            else:
                win = wins[il]
                n, known, nw, no = flashstep.layer_select(*self._step[il], pos, win.capacity if win else 0, w.ts,
                                                          self.ptsets)
            ts.predicted += n
            ts.active += n
            ffn.run_layer(s.x, il, sel.active, sel.gvals, n, known, nw, no, s.xb, s.xq_embd, c.activation,
                          self.thresholds[il], self._post[il], self.t, ts)
            il += 1
        if logits:
            self.decode_head(eps, ts)
        # compute = everything that is not reading or window bookkeeping
        ts.compute_ms = (time.perf_counter() - t_all) * 1e3 - ts.io_ms - ts.mm_ms
        ts.hit_rate = 1.0 - ts.loaded / max(ts.predicted, 1) if self.mode == "flash" else 0.0
        self.t += 1
        ts.rss = self._watchdog()
        self.stats.append(ts)
        self.store.check_unchanged()   # the file changed while this token read it: its logits may mix two files
        return s.logits

    def set_head_need(self, need: HeadNeed) -> None:
        """The sampler of the coming tokens (flash/head_index.py): with a head index, decoding reads only
        the head rows it can pick. EXACT (the default) reads the whole head."""
        self.head_need = need

    def decode_head(self, eps, stats) -> None:
        """The logits of the state in st.x: from the index when there is one and the sampler allows
        it, else the whole head."""
        if self.indexed is not None and self.head_need.kind != "exact":
            self.indexed(eps, stats, self.head_need)
        else:
            self.out_head(eps, stats)
            stats.head_rows = self.cfg.n_vocab

    def _watchdog(self) -> int:
        """RSS at every token: shrink the windows before the cap (the overflow staging computes what
        they no longer hold); past it, RamCapError."""
        r = budget.rss()
        if self.cap is None:
            return r
        tries = 0
        while r > self.cap - HEADROOM and self.windows and tries < 8:
            self.ffn.shrink(0.9)
            r = budget.rss()
            tries += 1
        if r > self.cap:
            raise RamCapError(f"{self.file.path}: RSS {mib(r)} exceeds the cap {mib(self.cap)}")
        return r

    def prefill(self, tokens, pos0: int = 0, logits_rows: str = "last"):
        tokens = [int(t) for t in tokens]
        self._check_pos(pos0, len(tokens))
        if logits_rows == "all":
            return self._prefill_all(tokens, pos0)
        if not tokens:
            return self.st.logits
        for t in tokens:
            if not 0 <= t < self.cfg.n_vocab:
                raise GGUFFormatError(f"{self.file.path}: token id {t} out of range")
        self.chunked.run(tokens, pos0)
        self.store.check_unchanged()   # as in forward: no logits from a file that changed while read
        return self.st.logits

    def _prefill_all(self, tokens, pos0):
        """Yields (start, logits (m, n_vocab)): chunks as in prefill, the head on logit_rows hidden states
        at a time (a streamed head read once per group)."""
        for t in tokens:
            if not 0 <= t < self.cfg.n_vocab:
                raise GGUFFormatError(f"{self.file.path}: token id {t} out of range")
        if self.logit_rows == 1:
            out = self.st.logits[None, :]
        else:
            out = np.zeros((self.logit_rows, self.cfg.n_vocab), np.float32)
        yield from self.chunked.run_rows(tokens, pos0, out)

    def close(self):
        self.store.close()


def part_tsets(info) -> tuple:
    """The (gate, up, down) type sets of the file's bundle parts (dispatch.part_type_sets)."""
    return dispatch.part_type_sets(l.types for l in info.layers)


def chunk_tset(info) -> tuple:
    """The type set of the prompt chunk's kernels (sparse.gate_chunk, sparse.sparse_ffn_chunk), which
    decode whole bundle parts of any layer: the ggml types of every part (column down parts have none).
    The model's own type set (attention, head, embedding) leaves them out, so a file whose parts have
    other types than its weights (--down-type Q5_0) shares those kernels with its source."""
    return dispatch.type_set({int(t) for l in info.layers for t in l.types if int(t) not in COLS_TYPES})
