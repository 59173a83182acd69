"""FlashModel: the forward pass of a flash GGUF under a RAM cap (DESIGN.md sections 1, 5, 6).

Per token and layer: attention (resident weights) -> FFN input -> choose active neurons (low-rank
predictor, or exact gate values from resident gate rows) -> window.update (LRU-free slots, paper 3.3)
-> store.read_rows (only the missing bundles, coalesced, parallel) -> sparse FFN over the slots.
Modes: "flash" (the product), "naive" (every FFN bundle read from the file every token, the paper's
baseline), "dense" (every bundle resident, every neuron computed: the identity with the source model
up to the down re-quantization). Same interface as model.Model: forward, prefill, head, cfg, n_ctx.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

import numba

from ..config import config_from_gguf
from ..errors import (ContextOverflowError, GGUFFormatError, InvalidArgumentError, RamCapError,
                      UnsupportedModelError)
from ..kernels import compile_in_child, dispatch, forward as fw, nn, sparse
from ..model import RunState, Weights, set_threads
from . import budget
from .format import read_flash
from . import diskprobe
from .store import BundleStore
from .window import Window

log = logging.getLogger(__name__)
MODES = ("flash", "naive", "dense")
HEAD_CHUNK = 2 << 20  # bytes of a streamed output head in RSS at once
SELECTORS = ("auto", "predictor", "gate")


def warm_kernels(path) -> None:
    """Load (compiling if needed) every kernel FlashModel uses, by opening `path` in naive mode (which
    reads nothing large), and leave a marker in numba's cache folder (named after the kernel sources)."""
    import os
    from ..gguf_file import GGUFFile
    FlashModel(GGUFFile(path), mode="naive", n_ctx=16)
    with open(os.path.join(numba.config.CACHE_DIR, "flash-runtime.warm"), "w") as fh:
        fh.write("kernels of gguf_flash.flash.runtime compiled\n")


def compile_out_of_process(path) -> None:
    """On a fresh clone, compile the runtime's kernels in a child process (kernels.compile_in_child)
    before the plan measures this process's RSS: in-process, LLVM's compiling memory made the runtime
    look 734 MiB instead of ~210 and the first `run --max-ram 360M` was refused. Once the marker exists
    this costs nothing."""
    import os
    if os.path.exists(os.path.join(numba.config.CACHE_DIR, "flash-runtime.warm")):
        return
    log.info("compiling the flash kernels once (about a minute)")
    compile_in_child("import sys; from gguf_flash.flash.runtime import warm_kernels; warm_kernels(sys.argv[1])",
                     os.fspath(path))


@dataclass
class TokenStats:
    predicted: int = 0      # neurons chosen (summed over layers)
    active: int = 0         # of those, |act(gate . x)| > threshold: exactly computed contributions
    loaded: int = 0         # bundles read from the file
    bytes_read: int = 0
    read_calls: int = 0
    hit_rate: float = 0.0   # chosen neurons already in the window
    io_ms: float = 0.0
    mm_ms: float = 0.0      # window bookkeeping (memory management)
    compute_ms: float = 0.0
    rss: int = 0


class FlashModel:
    def __init__(self, f, *, max_ram=None, mode: str = "flash", selector: str = "auto",
                 n_ctx: int | None = None, n_threads: int | None = None, cold: bool = False,
                 window_k: int = 8, io_threads: int = 4):
        if mode not in MODES:
            raise InvalidArgumentError(f"--mode {mode}: choose one of {', '.join(MODES)}")
        if selector not in SELECTORS:
            raise InvalidArgumentError(f"--selector {selector}: choose one of {', '.join(SELECTORS)}")
        set_threads(n_threads)
        self.file, self.mode = f, mode
        self.cfg = c = config_from_gguf(f)
        self.info = info = read_flash(f, c)
        for il, l in enumerate(info.layers):
            for part, qt in zip(("gate", "up", "down"), l.types):
                if qt not in dispatch.SUPPORTED:
                    raise UnsupportedModelError(f"{f.path}: layer {il} {part} rows have ggml type {qt}, "
                                                f"which this engine does not implement")
        self.n_ctx = int(n_ctx) if n_ctx else min(1024 if max_ram else 4096, c.n_ctx_train)
        self.w = Weights(f, c, ffn=False)
        self.st = RunState(c, self.n_ctx)
        L = c.n_layer
        self.active = np.arange(c.n_ff, dtype=np.int32)  # (n_ff,) chosen rows this layer (all unless flash)
        self.gvals = np.zeros(c.n_ff, np.float32)    # (n_ff,) their gate values (gate mode)
        self.z = np.zeros(c.n_ff, np.float32)        # (n_ff,) predictor logits
        self.ffn_out = np.zeros(c.n_embd, np.float32)
        self.partial = np.zeros((max(2, numba.get_num_threads()), c.n_embd), np.float32)  # (n_part, n_embd)

        pred_bytes = sum((l.pred_a.size + l.pred_b.size + l.pred_bias.size) * 4 for l in info.layers)
        gate_bytes = sum(c.n_ff * l.part_bytes[0] for l in info.layers)
        # auto: exact gate rows when the cap holds them (measured on GPL-3, 2 chunks: Gemma +0.8%
        # perplexity with gate rows, +13.5% with the recall-0.95 predictor), else the smaller predictor
        auto = selector == "auto" and mode == "flash"
        if selector == "auto":
            selector = "gate"
        self.selector = selector if mode == "flash" else "none"
        self.thresholds = np.array([l.threshold for l in info.layers], np.float32) if mode == "flash" \
            else np.zeros(L, np.float32)

        # ---- the plan (refuses an impossible cap before anything large is loaded) ----
        bb = [l.bundle_bytes for l in info.layers]
        attn = int(sum(self.w.mats[il, j, 1] * self.w.mats[il, j, 2] for il in range(L) for j in range(4)))
        head = int(self.w.output[1] * self.w.output[2])
        scratch = sum(a.nbytes for a in vars(self.st).values() if isinstance(a, np.ndarray)) \
            - self.st.k_cache.nbytes - self.st.v_cache.nbytes
        resident = {"attention": attn, "output head": head,
                    "KV cache": self.st.k_cache.nbytes + self.st.v_cache.nbytes, "scratch": scratch}
        if self.selector == "predictor":
            resident["predictors"] = pred_bytes
        elif self.selector == "gate":
            resident["gate rows"] = gate_bytes
        if mode == "naive":
            resident["naive staging"] = max(bb) * c.n_ff
            min_slots = want_slots = [0] * L
        elif mode == "dense":
            min_slots = want_slots = [c.n_ff] * L
        else:
            layer_sparsity = np.asarray(f.get("flash.sparsity.layer", [info.sparsity] * L), np.float64)
            min_slots = [max(1, int(math.ceil((1 - s) * c.n_ff))) for s in layer_sparsity]
            want_slots = [c.n_ff] * L
        self.cap = budget.parse_size(max_ram) if max_ram is not None else None
        max_range = max(1 << 20, 2 * max(bb))
        gap = 64 << 10
        probed = diskprobe.load(f.path)
        if probed:  # `gguf-flash bench-io` measured this device: its coalescing gap and thread count
            gap, io_threads = diskprobe.recommend(probed)
            io_threads = min(io_threads, 8)
        resident["I/O staging"] = io_threads * max_range
        if self.cap is not None:
            compile_out_of_process(f.path)
        self._warmup()
        baseline = budget.rss()  # Python, numpy, numba and the compiled kernels, measured
        if self.cap is not None:
            try:
                self.plan = budget.make_plan(self.cap, baseline, resident, head, bb, min_slots, want_slots, f.path)
            except RamCapError:
                if not (auto and pred_bytes < gate_bytes):
                    raise
                self.selector = "predictor"
                resident.pop("gate rows")
                resident["predictors"] = pred_bytes
                self.plan = budget.make_plan(self.cap, baseline, resident, head, bb, min_slots, want_slots, f.path)
        else:
            self.plan = budget.Plan(0, baseline, resident, sum(b * n for b, n in zip(bb, want_slots)),
                                    list(want_slots))
        log.info("RAM plan: %s", self.plan.describe())

        # ---- per-layer arrays ----
        self.types = [np.array(l.types, np.int64) for l in info.layers]
        self.offs = [np.array(np.cumsum((0,) + l.part_bytes), np.int64) for l in info.layers]
        self.store = BundleStore(f.path, info.layers[0].bundle_offset, bb[0], c.n_ff, cold=cold,
                                 n_threads=io_threads, gap_bytes=gap, stat=f.stat, max_range=max_range)
        self.windows = [Window(c.n_ff, bb[il], max(self.plan.capacities[il], 1), window_k) for il in range(L)] \
            if mode != "naive" else []
        if mode == "naive":
            self.staging = np.zeros((c.n_ff, max(bb)), np.uint8)
            self.all_rows = np.arange(c.n_ff, dtype=np.int32)
        if self.selector == "predictor":
            self.pred_tmp = np.zeros(max(l.pred_a.shape[1] for l in info.layers), np.float32)
            self.pred = [(np.ascontiguousarray(l.pred_a, np.float32), np.ascontiguousarray(l.pred_b, np.float32))
                         for l in info.layers]   # (n_embd, r), (r, n_ff) f32, resident
        if self.selector == "gate":
            self.gates = self._read_gate_rows()
        if self.plan.head_streamed:
            rb = int(self.w.output[2])
            step = max(1, HEAD_CHUNK // rb)
            self.head_buf = np.zeros((step, rb), np.uint8)          # (step, row_bytes) one head chunk
            self.head_blob = self.head_buf.reshape(-1).view()        # read-only view: the file map's type
            self.head_blob.flags.writeable = False
            self.head_idx = np.arange(step, dtype=np.int32)
            self.head_rows = np.zeros(step, np.int32)
            self.head_desc = self.w.output.copy()
            self.head_desc[0] = 0                                    # rows start at the buffer's byte 0
        if mode == "dense":
            for il in range(L):
                self._load(il, np.arange(c.n_ff, dtype=np.int32), 0)
        self.stats: list = []
        self.t = 0   # token counter for the window

    # ---- set-up helpers ----
    def _warmup(self):
        """Load every compiled kernel the token loop uses (from numba's cache) on tiny inputs, so the
        runtime's own RSS can be measured before the plan, and nothing compiles under the cap."""
        c, s, w = self.cfg, self.st, self.w
        fw.embed(s.x, w.blob, w.embd, 0, w.fp[fw.FP_EMBD_SCALE])
        nn.rope_cos_sin(s.cos[0], s.sin[0], 0, w.inv_freq[0])
        nn.rmsnorm(s.xb, s.x, w.norms[0, fw.NORM_FFN], 1e-5)
        dispatch.quantize_x(s.xq_embd, s.xb)
        fw.residual_add(s.x, s.xb, w.norms[0, fw.NORM_POST_FFW], 1e-5, False)
        one = np.zeros((1, self.info.layers[0].bundle_bytes), np.uint8)
        fw.attention_layer(s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.k_cache, s.v_cache, s.cos, s.sin,
                           s.xq_embd, s.xq_q, w.blob, w.mats, w.norms, w.qk_norms, w.biases, w.swa,
                           w.ip, w.fp, 0, 0)
        sparse.sparse_ffn(self.ffn_out, self.partial, one, np.zeros(c.n_ff, np.int32),
                          np.zeros(1, np.int32), 0, np.zeros(1, np.float32), False, s.xb, s.xq_embd,
                          np.array(self.info.layers[0].types, np.int64),
                          np.array(np.cumsum((0,) + self.info.layers[0].part_bytes), np.int64),
                          c.activation, np.float32(0))
        sparse.select_by_gate(np.zeros(1, np.int32), np.zeros(1, np.float32), s.hg[:1], c.activation, 0.0)
        sparse.select_by_logit(np.zeros(1, np.int32), s.hg[:1], 0.0, True)
        l0 = self.info.layers[0]
        r = l0.pred_a.shape[1]
        sparse.predictor_logits(s.hg[:1], np.zeros(r, np.float32), s.xb, np.zeros((c.n_embd, r), np.float32),
                                np.zeros((r, 1), np.float32), l0.pred_bias[:1])
        sparse.matvec_rows(s.hg[:1], np.zeros((1, l0.part_bytes[0]), np.uint8), int(l0.types[0]), s.xb,
                           s.xq_embd)
        head = self.w.output.copy()
        head[1] = 1
        dispatch.matvec(s.logits[:1], w.blob, head, s.xb, s.xq_embd)
        fw.output_head(s.logits[:1], s.x, s.xb, s.xq_embd, w.blob, head, w.output_norm, 1e-5)
        nn.rmsnorm(s.xb, s.x, w.output_norm, 1e-5)
        self.file.release(int(head[0]), int(head[2]))
        win = Window(4, 8, 4, 1)
        win.update(np.arange(2, dtype=np.int32), 0)

    def _head(self, eps, ts):
        """logits = W_out @ RMSNorm(x). A streamed head is read through the store (O_DIRECT when cold,
        like the bundles: the page cache cannot hold it for us) into one chunk buffer, so it never
        holds more than HEAD_CHUNK in RSS; its reads count in the token's I/O."""
        w, s = self.w, self.st
        if not self.plan.head_streamed:
            fw.output_head(s.logits, s.x, s.xb, s.xq_embd, w.blob, w.output, w.output_norm, eps)
            return
        nn.rmsnorm(s.xb, s.x, w.output_norm, eps)
        dispatch.quantize_x(s.xq_embd, s.xb)
        off, n_rows, rb = int(w.output[0]), int(w.output[1]), int(w.output[2])
        step = self.head_buf.shape[0]
        m = self.head_desc
        self.store.select(off, rb, n_rows)
        for r0 in range(0, n_rows, step):
            n = min(step, n_rows - r0)
            np.add(self.head_idx[:n], r0, out=self.head_rows[:n])
            rs = self.store.read_rows(self.head_rows[:n], self.head_buf, self.head_idx[:n])
            ts.bytes_read += rs.bytes_read
            ts.read_calls += rs.n_reads
            ts.io_ms += rs.ms
            m[1] = n
            dispatch.matvec(s.logits[r0:r0 + n], self.head_blob, m, s.xb, s.xq_embd)

    def _read_gate_rows(self):
        """Gate rows of every layer, resident (n_ff, gate_bytes) uint8, read once through the store."""
        out = []
        for il, l in enumerate(self.info.layers):
            buf = np.zeros((self.cfg.n_ff, l.bundle_bytes), np.uint8)
            self.store.select(l.bundle_offset, l.bundle_bytes, self.cfg.n_ff)
            rows = np.arange(self.cfg.n_ff, dtype=np.int32)
            self.store.read_rows(rows, buf, rows)
            out.append(np.ascontiguousarray(buf[:, :l.part_bytes[0]]))
            del buf
        return out

    def _load(self, il, rows, t):
        """window.update + read of the missing bundles; returns (missing count, ReadStats, mm ms)."""
        l = self.info.layers[il]
        win = self.windows[il]
        t0 = time.perf_counter()
        missing, slots = win.update(rows, t)
        mm = (time.perf_counter() - t0) * 1e3
        self.store.select(l.bundle_offset, l.bundle_bytes, self.cfg.n_ff)
        rs = self.store.read_rows(missing, win.slots, slots)
        return len(missing), rs, mm

    # ---- forward ----
    def _check_pos(self, pos, n=1):
        if pos < 0 or pos + n > self.n_ctx:
            raise ContextOverflowError(f"{self.file.path}: {pos + n} tokens do not fit the context of "
                                       f"{self.n_ctx} (use -c to enlarge it)")

    def forward(self, token: int, pos: int) -> np.ndarray:
        self._check_pos(pos)
        if not 0 <= token < self.cfg.n_vocab:
            raise GGUFFormatError(f"{self.file.path}: token id {token} out of range")
        self.store.check_unchanged()
        c, w, s = self.cfg, self.w, self.st
        ts = TokenStats()
        tc = time.perf_counter()
        fw.embed(s.x, w.blob, w.embd, int(token), w.fp[fw.FP_EMBD_SCALE])
        nn.rope_cos_sin(s.cos[0], s.sin[0], pos, w.inv_freq[0])
        nn.rope_cos_sin(s.cos[1], s.sin[1], pos, w.inv_freq[1])
        compute = time.perf_counter() - tc
        eps = float(w.fp[fw.FP_EPS])
        for il in range(c.n_layer):
            tc = time.perf_counter()
            fw.attention_layer(s.x, s.xb, s.q, s.k, s.v, s.att, s.scores, s.k_cache, s.v_cache, s.cos, s.sin,
                               s.xq_embd, s.xq_q, w.blob, w.mats, w.norms, w.qk_norms, w.biases, w.swa,
                               w.ip, w.fp, il, pos)
            nn.rmsnorm(s.xb, s.x, w.norms[il, fw.NORM_FFN], eps)
            dispatch.quantize_x(s.xq_embd, s.xb)
            n, have_gate = self._select(il, ts)
            compute += time.perf_counter() - tc
            if self.mode == "naive":
                l = self.info.layers[il]
                self.store.select(l.bundle_offset, l.bundle_bytes, c.n_ff)
                slots = self.staging[:, :l.bundle_bytes] if l.bundle_bytes == self.staging.shape[1] \
                    else self.staging.reshape(-1)[:c.n_ff * l.bundle_bytes].reshape(c.n_ff, l.bundle_bytes)
                rs = self.store.read_rows(self.all_rows, slots, self.all_rows)
                neuron_slot, loaded, mm = self.all_rows, c.n_ff, 0.0
            else:
                loaded, rs, mm = self._load(il, self.active[:n], self.t)
                slots, neuron_slot = self.windows[il].slots, self.windows[il].neuron_slot
            ts.loaded += loaded
            ts.bytes_read += rs.bytes_read
            ts.read_calls += rs.n_reads
            ts.io_ms += rs.ms
            ts.mm_ms += mm
            tc = time.perf_counter()
            sparse.sparse_ffn(self.ffn_out, self.partial, slots, neuron_slot, self.active, n, self.gvals,
                              have_gate, s.xb, s.xq_embd, self.types[il], self.offs[il], c.activation,
                              self.thresholds[il])
            fw.residual_add(s.x, self.ffn_out, w.norms[il, fw.NORM_POST_FFW], eps, c.post_norms)
            compute += time.perf_counter() - tc
        tc, io0 = time.perf_counter(), ts.io_ms
        self._head(eps, ts)
        ts.compute_ms = (compute + time.perf_counter() - tc) * 1e3 - (ts.io_ms - io0)
        ts.hit_rate = 1.0 - ts.loaded / max(ts.predicted, 1) if self.mode == "flash" else 0.0
        self.t += 1
        ts.rss = self._watchdog()
        self.stats.append(ts)
        return s.logits

    def _select(self, il, ts):
        """Fill self.active[:n] with the rows to compute; returns (n, gate values known)."""
        c = self.cfg
        if self.mode != "flash":
            ts.predicted += c.n_ff
            ts.active += c.n_ff
            return c.n_ff, False
        l = self.info.layers[il]
        s = self.st
        if self.selector == "gate":
            sparse.matvec_rows(s.hg, self.gates[il], int(l.types[0]), s.xb, s.xq_embd)
            n = sparse.select_by_gate(self.active, self.gvals, s.hg, c.activation, l.threshold)
            score = None
        else:
            a, b = self.pred[il]
            sparse.predictor_logits(self.z, self.pred_tmp[:a.shape[1]], s.xb, a, b, l.pred_bias)
            n = sparse.select_by_logit(self.active, self.z, l.pred_offset, l.pred_abs)
            score = self.z
        cap = self.windows[il].capacity
        if n > cap:  # more than the window holds at this cap: keep the strongest
            rows = self.active[:n]
            strength = np.abs(s.hg[rows]) if score is None else np.abs(score[rows])
            keep = np.sort(rows[np.argsort(-strength, kind="stable")[:cap]])
            if score is None:
                self.gvals[:cap] = s.hg[keep]
            self.active[:cap] = keep
            n = cap
        ts.predicted += n
        ts.active += n
        return n, self.selector == "gate"

    def _watchdog(self) -> int:
        """RSS at every token: shrink the windows before the cap; past it, RamCapError."""
        r = budget.rss()
        if self.cap is None:
            return r
        tries = 0
        while r > self.cap - budget.HEADROOM and self.windows and tries < 8:
            for win in self.windows:
                win.shrink(max(1, int(win.capacity * 0.9)))
            r = budget.rss()
            tries += 1
        if r > self.cap:
            raise RamCapError(f"{self.file.path}: RSS {budget.mib(r)} exceeds the cap {budget.mib(self.cap)}")
        return r

    def prefill(self, tokens, pos0: int = 0, logits_rows: str = "last"):
        tokens = [int(t) for t in tokens]
        self._check_pos(pos0, len(tokens))
        if logits_rows == "all":
            return self._prefill_all(tokens, pos0)
        for i, t in enumerate(tokens):
            logits = self.forward(t, pos0 + i)
        return logits

    def _prefill_all(self, tokens, pos0):
        for i, t in enumerate(tokens):
            yield i, self.forward(t, pos0 + i)[None, :]

    def close(self):
        self.store.close()
