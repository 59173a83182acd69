"""KV cache elements: float32, or IEEE half stored as uint16 (llama.cpp's default `-ctk f16 -ctv f16`).

numba has no float16 type on the CPU, so a half cache is a uint16 array and these generic helpers
convert on the way in (LLVM fptrunc, round to nearest even) and out (fpext, F16C's vcvtph2ps on AVX2).
Every attention kernel is compiled once per cache dtype.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .quant_basic import _u16_as_f16_to_f32

KV_TYPES = {"f16": np.uint16, "f32": np.float32}   # -ctk/-ctv name -> storage dtype


@intrinsic
def _f32_to_f16_bits(typingctx, x):
    """uint16 bits of the IEEE half nearest to the float32 `x`."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def kv_get(row, i):
    """row[i] as float32."""
    if row.dtype == np.uint16:
        return np.float32(np.uint16(row[i]).view(np.float16))
    return np.float32(row[i])


def kv_put(row, src):
    """row[:] = src (float32), converted to the row's storage."""
    if row.dtype == np.uint16:
        row[:] = np.asarray(src, np.float32).astype(np.float16).view(np.uint16)
    else:
        row[:] = src


if not numba.config.DISABLE_JIT:
    @overload(kv_get, inline="always")
    def _kv_get(row, i):
        if row.dtype == types.uint16:
            return lambda row, i: _u16_as_f16_to_f32(row[i])
        return lambda row, i: row[i]

    @overload(kv_put, inline="always")
    def _kv_put(row, src):
        if row.dtype == types.uint16:
            def put_half(row, src):
                for i in range(src.shape[0]):
                    row[i] = _f32_to_f16_bits(src[i])
            return put_half

        def put(row, src):
            for i in range(src.shape[0]):
                row[i] = src[i]
        return put
