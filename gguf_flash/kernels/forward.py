"""The transformer forward pass as compiled functions: one token (decode) and a batch (prompt).

Every architecture runs through the same code; the per-architecture differences are data in `ip`/`fp`
(config.py fix-ups), not branches on an architecture name. Arrays (see model.py for how they are built):
    blob      (file_size,) uint8        the memory-mapped GGUF file
    mats      (n_layer, 7, 4) int64     (offset, n_rows, row_bytes, qtype) of Q, K, V, O, GATE, UP, DOWN
    norms     (n_layer, 4, n_embd) f32  ATTN_NORM, FFN_NORM, POST_ATTN_NORM, POST_FFW_NORM
    qk_norms  (n_layer, 2, head_dim) f32
    biases    (n_layer, 3, q_dim) f32   q, k, v biases (k, v use the first kv_dim)
    inv_freq  (2, rope_dim / 2) f32     RoPE frequencies: [global layers, sliding-window layers]
    swa       (n_layer,) int64          1 where the layer uses sliding-window attention
    ip        int64 hyperparameters (IP_* below); fp float32 (FP_* below)
    k_cache, v_cache (n_layer, n_ctx, kv_dim) f32, or uint16 holding IEEE halves (kernels/kvcache.py)
    xq_embd, xq_q, xq_ff      uint8 scratch: an input vector of n_embd, q_dim, n_ff quantized once
                              (dispatch.quantize_x) and shared by every matvec that reads it
"""

import numpy as np
from numba import njit, prange

from .quant_basic import round_q8

from .dispatch import dequant_row, matmat, matvec, quantize_x, uses_q8x
from .kvcache import kv_put
from .nn import (FASTMATH, attention, attention_batch, gate_rule, glu, glu_product, product_rule, rmsnorm,
                 rmsnorm_heads, rope, rope_cos_sin)

MAT_Q, MAT_K, MAT_V, MAT_O, MAT_GATE, MAT_UP, MAT_DOWN = range(7)
NORM_ATTN, NORM_FFN, NORM_POST_ATTN, NORM_POST_FFW = range(4)
(IP_N_LAYER, IP_N_EMBD, IP_N_FF, IP_N_HEAD, IP_N_HEAD_KV, IP_HEAD_DIM, IP_ROPE_STYLE, IP_ACT,
 IP_WINDOW, IP_QK_NORM, IP_QKV_BIAS, IP_POST_NORMS, IP_N_VOCAB) = range(13)
FP_EPS, FP_ATTN_SCALE, FP_EMBD_SCALE = range(3)


@njit(cache=True, fastmath=FASTMATH)
def embed(x, blob, embd_m, token, scale, tset):
    """x (n_embd,) = token_embd[token] * scale (one row read from the quantized table)."""
    dequant_row(x, blob, embd_m, token, tset)
    if scale != 1.0:
        for i in range(x.shape[0]):
            x[i] *= scale


@njit(cache=True, fastmath=FASTMATH)
def add_bias(x, b):
    for i in range(x.shape[0]):
        x[i] += b[i]


@njit(cache=True, fastmath=FASTMATH)
def residual_add(x, y, post_w, eps, post_norm):
    """x += (post_norm ? RMSNorm(y) * post_w : y); y is clobbered."""
    if post_norm:
        rmsnorm(y, y, post_w, eps)
    for i in range(x.shape[0]):
        x[i] += y[i]


@njit(cache=True, fastmath=FASTMATH)
def attention_layer(x, xb, q, k, v, att, scores, k_cache, v_cache, cos, sin, xq_embd, xq_q,
                    blob, mats, norms, qk_norms, biases, swa, ip, fp, il, pos, tset):
    """x (n_embd,) += attention block of layer il for the token at pos (its K/V stored in the cache)."""
    n_head, n_head_kv, hd = ip[IP_N_HEAD], ip[IP_N_HEAD_KV], ip[IP_HEAD_DIM]
    eps = fp[FP_EPS]
    rmsnorm(xb, x, norms[il, NORM_ATTN], eps)
    quantize_x(xq_embd, xb)
    matvec(q, blob, mats[il, MAT_Q], xb, xq_embd, tset)
    matvec(k, blob, mats[il, MAT_K], xb, xq_embd, tset)
    matvec(v, blob, mats[il, MAT_V], xb, xq_embd, tset)
    if ip[IP_QKV_BIAS]:
        add_bias(q, biases[il, 0])
        add_bias(k, biases[il, 1])
        add_bias(v, biases[il, 2])
    if ip[IP_QK_NORM]:
        rmsnorm_heads(q, qk_norms[il, 0], n_head, hd, eps)
        rmsnorm_heads(k, qk_norms[il, 1], n_head_kv, hd, eps)
    local = swa[il]
    rope(q, cos[local], sin[local], n_head, hd, ip[IP_ROPE_STYLE])
    rope(k, cos[local], sin[local], n_head_kv, hd, ip[IP_ROPE_STYLE])
    kv_put(k_cache[il, pos], k)
    kv_put(v_cache[il, pos], v)
    window = ip[IP_WINDOW] if local else 0
    attention(att, q, k_cache[il], v_cache[il], scores, pos, window, n_head, n_head_kv, hd, fp[FP_ATTN_SCALE])
    quantize_x(xq_q, att)
    matvec(xb, blob, mats[il, MAT_O], att, xq_q, tset)
    residual_add(x, xb, norms[il, NORM_POST_ATTN], eps, ip[IP_POST_NORMS])


@njit(cache=True, fastmath=FASTMATH)
def ffn_layer_dense(x, xb, hg, hu, xq_embd, xq_ff, blob, mats, norms, ip, fp, il, threshold, tset):
    """x (n_embd,) += down(act(gate . h) * (up . h)), h = RMSNorm(x) * ffn_norm, over every neuron
    (neurons with |act(gate . h)| <= threshold contribute 0: the exact-gate sparse model)."""
    eps = fp[FP_EPS]
    rmsnorm(xb, x, norms[il, NORM_FFN], eps)
    quantize_x(xq_embd, xb)
    matvec(hg, blob, mats[il, MAT_GATE], xb, xq_embd, tset)
    matvec(hu, blob, mats[il, MAT_UP], xb, xq_embd, tset)
    glu(hg, hg, hu, ip[IP_ACT], threshold)
    quantize_x(xq_ff, hg)
    matvec(xb, blob, mats[il, MAT_DOWN], hg, xq_ff, tset)
    residual_add(x, xb, norms[il, NORM_POST_FFW], eps, ip[IP_POST_NORMS])


@njit(cache=True, fastmath=FASTMATH)
def output_head(logits, x, xb, xq_embd, blob, out_m, out_norm, eps, tset):
    """logits (n_vocab,) = W_out @ (RMSNorm(x) * output_norm)."""
    rmsnorm(xb, x, out_norm, eps)
    quantize_x(xq_embd, xb)
    matvec(logits, blob, out_m, xb, xq_embd, tset)


@njit(cache=True, fastmath=FASTMATH)
def forward_token(logits, x, xb, q, k, v, att, scores, hg, hu, k_cache, v_cache, cos, sin,
                  xq_embd, xq_q, xq_ff, blob, mats, norms, qk_norms, biases, swa, inv_freq, embd_m, out_m, out_norm,
                  thresholds, ip, fp, token, pos, tset):
    """Dense decode step: logits (n_vocab,) for `token` at `pos`. Allocates nothing.
    thresholds (n_layer,) f32: per-layer FFN activation thresholds (zeros: dense)."""
    embed(x, blob, embd_m, token, fp[FP_EMBD_SCALE], tset)
    rope_cos_sin(cos[0], sin[0], pos, inv_freq[0])
    rope_cos_sin(cos[1], sin[1], pos, inv_freq[1])
    for il in range(ip[IP_N_LAYER]):
        attention_layer(x, xb, q, k, v, att, scores, k_cache, v_cache, cos, sin, xq_embd, xq_q,
                        blob, mats, norms, qk_norms, biases, swa, ip, fp, il, pos, tset)
        ffn_layer_dense(x, xb, hg, hu, xq_embd, xq_ff, blob, mats, norms, ip, fp, il, thresholds[il], tset)
    output_head(logits, x, xb, xq_embd, blob, out_m, out_norm, fp[FP_EPS], tset)


# ---- prompt batch -------------------------------------------------------------------------------

@njit(cache=True, fastmath=FASTMATH, parallel=True)
def rows_rmsnorm(out, x, w, eps):
    for j in prange(x.shape[0]):
        rmsnorm(out[j], x[j], w, eps)


@njit(cache=True, parallel=True)
def rows_round_q8(out, x):
    """out[j] = x[j] as 8-bit blocks (quant_basic.round_q8), every row."""
    for j in prange(x.shape[0]):
        round_q8(out[j], x[j])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def rows_residual(x, y, post_w, eps, post_norm):
    for j in prange(x.shape[0]):
        residual_add(x[j], y[j], post_w, eps, post_norm)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def rows_glu(HG, HU, act, threshold, ffn_scale, il):
    """HG[j] = glu(HG[j], HU[j]) for every row j (nn.glu), or nn.glu_product with ffn_scale[il] when
    ffn_scale has layers. A negative threshold -k is the criterion's per-token top-k rule: row j keeps
    its own k largest |act(g)| (nn.topk_threshold), or with ffn_scale its k largest |act(g) u| scale
    (nn.product_topk_threshold); a scratch row is allocated then (the converter's evaluation, not a
    decode path)."""
    for j in prange(HG.shape[0]):
        t = threshold
        if threshold < 0.0:   # a top-k rule: its scratch row allocated here only (dense prompts allocate nothing)
            scratch = np.empty(HG.shape[1], np.float32)
            t = product_rule(threshold, HG[j], HU[j], ffn_scale[il], act, scratch) if ffn_scale.shape[0] > 0 \
                else gate_rule(threshold, HG[j], act, scratch)
        if ffn_scale.shape[0] > 0:
            glu_product(HG[j], HG[j], HU[j], act, t, ffn_scale[il])
        else:
            glu(HG[j], HG[j], HU[j], act, t)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def rows_qk_rope(Q, K, V, cos, sin, k_cache, v_cache, biases, qk_norms, ip, eps, il, local, pos0):
    """Q, K, V (n, *) rows of the prompt batch: biases, per-head norms and RoPE in place, then K and V
    into the caches at positions pos0.. (each row independent, so the rows run in parallel)."""
    n_head, n_head_kv, hd = ip[IP_N_HEAD], ip[IP_N_HEAD_KV], ip[IP_HEAD_DIM]
    for j in prange(Q.shape[0]):
        if ip[IP_QKV_BIAS]:
            add_bias(Q[j], biases[il, 0])
            add_bias(K[j], biases[il, 1])
            add_bias(V[j], biases[il, 2])
        if ip[IP_QK_NORM]:
            rmsnorm_heads(Q[j], qk_norms[il, 0], n_head, hd, eps)
            rmsnorm_heads(K[j], qk_norms[il, 1], n_head_kv, hd, eps)
        rope(Q[j], cos[j, local], sin[j, local], n_head, hd, ip[IP_ROPE_STYLE])
        rope(K[j], cos[j, local], sin[j, local], n_head_kv, hd, ip[IP_ROPE_STYLE])
        kv_put(k_cache[il, pos0 + j], K[j])
        kv_put(v_cache[il, pos0 + j], V[j])


@njit(cache=True, fastmath=FASTMATH)
def attention_batch_layer(X, XB, XR, Q, K, V, ATT, ATR, scores, k_cache, v_cache, cos, sin, blob, mats,
                          norms, qk_norms, biases, swa, ip, fp, il, pos0, tset):
    """X (n, n_embd) += attention block of layer il for n tokens at positions pos0.. (the prompt batch;
    their K/V go to the caches). Buffers have exactly n rows; cos, sin (n, 2, rope_dim / 2).
    XR (n, n_embd), ATR (n, q_dim): with n rows, the matrices whose decode kernels read 8-bit input
    blocks get their input as those blocks (round_q8), so a prompt chunk computes what token-by-token
    decoding computes, up to float rounding (flash prefill); with 0 rows, float input (the dense batch)."""
    n_head, n_head_kv, hd = ip[IP_N_HEAD], ip[IP_N_HEAD_KV], ip[IP_HEAD_DIM]
    eps = fp[FP_EPS]
    rq = XR.shape[0] > 0
    rows_rmsnorm(XB, X, norms[il, NORM_ATTN], eps)
    if rq:
        rows_round_q8(XR, XB)
    matmat(Q, blob, mats[il, MAT_Q], XR if rq and uses_q8x(mats[il, MAT_Q, 3]) else XB, tset)
    matmat(K, blob, mats[il, MAT_K], XR if rq and uses_q8x(mats[il, MAT_K, 3]) else XB, tset)
    matmat(V, blob, mats[il, MAT_V], XR if rq and uses_q8x(mats[il, MAT_V, 3]) else XB, tset)
    local = swa[il]
    rows_qk_rope(Q, K, V, cos, sin, k_cache, v_cache, biases, qk_norms, ip, eps, il, local, pos0)
    window = ip[IP_WINDOW] if local else 0
    attention_batch(ATT, Q, k_cache[il], v_cache[il], scores, pos0, window, n_head, n_head_kv, hd,
                    fp[FP_ATTN_SCALE])
    if rq:
        rows_round_q8(ATR, ATT)
    matmat(XB, blob, mats[il, MAT_O], ATR if rq and uses_q8x(mats[il, MAT_O, 3]) else ATT, tset)
    rows_residual(X, XB, norms[il, NORM_POST_ATTN], eps, ip[IP_POST_NORMS])


@njit(cache=True, fastmath=FASTMATH)
def batch_embed(X, cos, sin, blob, embd_m, inv_freq, fp, tokens, pos0, tset):
    """X (n, n_embd) = the embeddings of tokens (n,); cos, sin (n, 2, rope_dim / 2) their RoPE tables
    at positions pos0.. ([global, local])."""
    for j in range(tokens.shape[0]):
        embed(X[j], blob, embd_m, tokens[j], fp[FP_EMBD_SCALE], tset)
        rope_cos_sin(cos[j, 0], sin[j, 0], pos0 + j, inv_freq[0])
        rope_cos_sin(cos[j, 1], sin[j, 1], pos0 + j, inv_freq[1])


@njit(cache=True, fastmath=FASTMATH)
def ffn_batch_layer(X, XB, HG, HU, blob, mats, norms, ip, fp, il, thresholds, ffn_scale, ffn_in, ci, tset):
    """X (n, n_embd) += FFN block of layer il for n tokens (the prompt batch). Buffers have exactly n rows.
    thresholds (n_layer,) f32 as in forward_token, or with ffn_scale (n_layer, n_ff) f32 (0 layers: not
    used) the product criterion |act(g_i) u_i| * ffn_scale[il, i] > thresholds[il] (nn.glu_product).
    ffn_in (k, >= n, n_embd) f32: ffn_in[ci] receives the FFN inputs (calibration); 0 layers: no copy."""
    n = X.shape[0]
    eps = fp[FP_EPS]
    rows_rmsnorm(XB, X, norms[il, NORM_FFN], eps)
    if ffn_in.shape[0] > 0:
        ffn_in[ci, :n] = XB
    matmat(HG, blob, mats[il, MAT_GATE], XB, tset)
    matmat(HU, blob, mats[il, MAT_UP], XB, tset)
    rows_glu(HG, HU, ip[IP_ACT], thresholds[il], ffn_scale, il)
    matmat(XB, blob, mats[il, MAT_DOWN], HG, tset)
    rows_residual(X, XB, norms[il, NORM_POST_FFW], eps, ip[IP_POST_NORMS])


@njit(cache=True, fastmath=FASTMATH)
def forward_batch(hidden, X, XB, Q, K, V, ATT, scores, HG, HU, k_cache, v_cache, cos, sin,
                  blob, mats, norms, qk_norms, biases, swa, inv_freq, embd_m, out_norm,
                  thresholds, ffn_scale, ffn_in, ip, fp, tokens, pos0, tset):
    """Prompt batch: tokens (n_tok,) at positions pos0.. through every layer; K/V go to the caches.
    hidden (n_tok, n_embd) = final RMSNorm(x) * output_norm (the head is applied by the caller, to the
    rows it needs). Batch buffers have >= n_tok rows; cos, sin (n_tok, 2, rope_dim / 2).
    thresholds, ffn_scale as in ffn_batch_layer; ffn_in (n_layer, >= n_tok, n_embd) f32 receives each
    layer's FFN input, or has 0 layers to skip that copy. The layer-major pass of the converter
    (flash/layerwise.py) calls the same three steps from Python, a layer at a time."""
    n = tokens.shape[0]
    X, XB, Q, K, V, ATT, HG, HU = X[:n], XB[:n], Q[:n], K[:n], V[:n], ATT[:n], HG[:n], HU[:n]
    batch_embed(X, cos[:n], sin[:n], blob, embd_m, inv_freq, fp, tokens, pos0, tset)
    for il in range(ip[IP_N_LAYER]):
        attention_batch_layer(X, XB, XB[:0], Q, K, V, ATT, ATT[:0], scores, k_cache, v_cache, cos, sin, blob,
                              mats, norms, qk_norms, biases, swa, ip, fp, il, pos0, tset)
        ffn_batch_layer(X, XB, HG, HU, blob, mats, norms, ip, fp, il, thresholds, ffn_scale, ffn_in, il, tset)
    rows_rmsnorm(hidden[:n], X, out_norm, fp[FP_EPS])
