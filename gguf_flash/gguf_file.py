"""Open a GGUF file: typed metadata, tensor infos, zero-copy tensor views.

`gguf.GGUFReader` builds a numpy object per array element, which takes 5-9 s on a 50k-262k token
vocabulary. This reader parses the same layout (gguf-py's constants and block sizes, the GGUF spec) with
bulk numpy reads for numeric arrays and one tight loop for string arrays, and maps the tensor data once.
tests/test_gguf_file.py checks it against `gguf.GGUFReader` on the real models.

Layout (GGUF v2/v3, little-endian):
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)            string = u64 length + utf-8 bytes
    n_tensors x (name: string, n_dims: u32, ne: u64[n_dims], type: u32, offset: u64)
    padding to general.alignment (default 32) | tensor data (each tensor at data_start + offset)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import GGUFFormatError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUFValueType -> (struct code, numpy dtype) for scalars and arrays of scalars
_SCALAR = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
           4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
           10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int               # GGMLQuantizationType value
    ne: tuple                # ggml order: ne[0] = row length (input dim), ne[1] = rows, ...
    offset: int              # absolute byte offset in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.qtype).name

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ne[1:], dtype=np.int64)) if len(self.ne) > 1 else 1

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.qtype)]
        return self.ne[0] // block * size


class _Cursor:
    """Sequential little-endian reads from a bytes-like buffer, with truncation checks."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int):
        if n > self.left():
            raise GGUFFormatError(f"{self.path}: truncated GGUF header (needs {self.pos + n} bytes, "
                                  f"file has {len(self.buf)})")
        start = self.pos
        self.pos += n
        return self.buf[start:self.pos]

    def scalar(self, code: str):
        return struct.unpack_from(code, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = self.take(n)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace")

    def need(self, count: int, min_bytes: int, what: str):
        """Refuse `count` items of at least `min_bytes` each when the rest of the file cannot hold them,
        before anything is allocated for them (a hostile count of 2^63 must not reach np.empty)."""
        if count * min_bytes > self.left():
            raise GGUFFormatError(f"{self.path}: truncated or corrupt GGUF: {what} declares {count} items "
                                  f"of at least {min_bytes} bytes, {self.left()} bytes are left")

    def string_array(self, count: int) -> list:
        self.need(count, 8, "a string array")
        if count < 4096:
            return [self.string() for _ in range(count)]
        # the 262,144-token vocabulary case: compiled offset scan, then one UTF-8 decode of all the
        # strings joined, cut at character offsets (valid when every string starts on a character)
        from .kernels.strings import string_array_offsets
        data = np.frombuffer(self.buf, dtype=np.uint8)
        starts, ends = np.empty(count, np.int64), np.empty(count, np.int64)
        pos = string_array_offsets(data, self.pos, count, starts, ends)
        if pos < 0 or pos > len(data):
            raise GGUFFormatError(f"{self.path}: truncated GGUF string array")
        self.pos = int(pos)
        lens = ends - starts
        keep = np.ones(int(ends[-1] - starts[0]), dtype=bool)       # drop the u64 lengths in between
        gaps = starts[1:] - starts[0] - 8
        for k in range(8):
            keep[gaps + k] = False
        joined = data[starts[0]:ends[-1]][keep]
        bounds = np.zeros(count + 1, np.int64)
        np.cumsum(lens, out=bounds[1:])
        lead = (joined & 0xC0) != 0x80                               # bytes that start a character
        try:
            text = joined.tobytes().decode("utf-8")
            cut_ok = bool(lead[bounds[:-1][lens > 0]].all())
        except UnicodeDecodeError:
            cut_ok = False
        if not cut_ok:  # invalid UTF-8 somewhere, or a string ending inside a character: one by one
            raw, b = joined.tobytes(), bounds.tolist()
            return [raw[x:y].decode("utf-8", errors="replace") for x, y in zip(b, b[1:])]
        char_at = np.zeros(len(joined) + 1, np.int64)
        np.cumsum(lead, out=char_at[1:])
        c = char_at[bounds].tolist()
        return [text[a:b] for a, b in zip(c, c[1:])]

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALAR:
                dtype = np.dtype(_SCALAR[itype][1]).newbyteorder("<")
                self.need(count, dtype.itemsize, "an array")
                raw = self.take(count * dtype.itemsize)
                return np.frombuffer(raw, dtype=dtype).copy()
            if itype == _STRING:
                return self.string_array(count)
            if itype == _ARRAY:
                self.need(count, 12, "an array of arrays")
                return [self.value(_ARRAY) for _ in range(count)]
            raise GGUFFormatError(f"{self.path}: unknown GGUF array element type {itype}")
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype}")


class GGUFFile:
    """A GGUF file: `.meta` (dict of typed values), `.tensors` (name -> TensorInfo), tensor views.

    Tensor views are slices of one read-only memory map: nothing is copied or loaded until touched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.stat = os.stat(self.path)
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except FileNotFoundError:
            raise GGUFFormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise GGUFFormatError(f"{self.path}: is a directory, not a GGUF file") from None
        except ValueError:  # numpy refuses to map an empty file
            raise GGUFFormatError(f"{self.path}: not a GGUF file (empty)") from None
        self.file_size = self.stat.st_size
        cur = _Cursor(memoryview(self._mm), self.path)
        if self.file_size < 24 or bytes(cur.take(4)) != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {self.version} (need 2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        # smallest key/value: 8-byte key length + 1 byte + 4-byte type + 1-byte value; smallest tensor
        # info: 8 + 1 + 4 (n_dims) + 4 (type) + 8 (offset)
        if n_tensors > 1 << 24 or n_kv > 1 << 24 or 14 * n_kv + 25 * n_tensors > cur.left():
            raise GGUFFormatError(f"{self.path}: implausible header (tensors={n_tensors}, kv={n_kv} in a "
                                  f"file of {self.file_size} bytes)")
        self.meta: dict = {}
        self.meta_types: dict = {}  # key -> (GGUFValueType, array element type or None), to copy keys
        for _ in range(n_kv):
            key = cur.string()
            if key in self.meta:
                raise GGUFFormatError(f"{self.path}: metadata key {key!r} appears twice")
            vtype, at = cur.scalar("<I"), cur.pos
            self.meta[key] = cur.value(vtype)
            itype = struct.unpack_from("<I", cur.buf, at)[0] if vtype == _ARRAY else None
            self.meta_types[key] = (vtype, itype)
        align = self.meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align > 1 << 20 \
                or align & (align - 1):
            raise GGUFFormatError(f"{self.path}: general.alignment {align!r} is not a power of two")
        self.alignment = align
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise GGUFFormatError(f"{self.path}: tensor {name} has {n_dims} dimensions")
            ne = tuple(cur.scalar("<Q") for _ in range(n_dims))
            qtype, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, ne, qtype, offset))
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, qtype, offset in infos:
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise UnsupportedModelError(f"{self.path}: tensor {name} has unknown ggml type {qtype}") from None
            if name in self.tensors:
                raise GGUFFormatError(f"{self.path}: tensor {name} appears twice")
            n_el = 1
            for d in ne:                     # Python ints: a hostile dim cannot wrap around
                n_el *= d
            if n_el == 0 or ne[0] % block:
                raise GGUFFormatError(f"{self.path}: tensor {name} has shape {list(ne)}, not a non-empty "
                                      f"multiple of its block size {block}")
            if offset % self.alignment:
                raise GGUFFormatError(f"{self.path}: tensor {name} data offset {offset} is not a multiple "
                                      f"of the alignment {self.alignment}")
            info = TensorInfo(name, qtype, ne, self.data_start + offset, n_el // block * size)
            if info.offset + info.n_bytes > self.file_size:
                raise GGUFFormatError(f"{self.path}: truncated (tensor {name} ends at byte "
                                      f"{info.offset + info.n_bytes}, file has {self.file_size})")
            self.tensors[name] = info
        ranges = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.tensors.values())
        for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
            if start < end:
                raise GGUFFormatError(f"{self.path}: tensors {a} and {b} overlap in the file")

    # ---- metadata ----
    @property
    def arch(self) -> str:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFFormatError(f"{self.path}: no general.architecture key")
        return arch

    def get(self, key: str, default=None):
        return self.meta.get(key, default)

    # ---- tensors ----
    def raw(self, name: str) -> np.ndarray:
        """(n_rows, row_bytes) uint8 read-only view of a tensor's data, whatever its type."""
        info = self.tensor(name)
        return self._mm[info.offset:info.offset + info.n_bytes].reshape(info.n_rows, info.row_bytes)

    def array(self, name: str) -> np.ndarray:
        """F32/F16/I32... tensor as a typed array in numpy order (ne reversed); no copy."""
        info = self.tensor(name)
        dtypes = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                  GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I8: np.int8,
                  GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.F64: np.float64}
        dtype = dtypes.get(GGMLQuantizationType(info.qtype))
        if dtype is None:
            raise UnsupportedModelError(f"{self.path}: tensor {name} is {info.type_name}, not a plain array")
        flat = self._mm[info.offset:info.offset + info.n_bytes].view(dtype)
        return flat.reshape(tuple(reversed(info.ne)))

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFFormatError(f"{self.path}: missing tensor {name}") from None

    def release(self, offset: int, n_bytes: int) -> None:
        """Drop the mapped pages of [offset, offset + n_bytes) from this process's RSS (they stay in the
        page cache). A page of the map that was read counts in RSS until released (DESIGN.md 5)."""
        import mmap
        page = mmap.PAGESIZE
        start = offset // page * page
        end = -(-(offset + n_bytes) // page) * page
        m = getattr(self._mm, "_mmap", None)
        if m is not None and end > start:
            m.madvise(mmap.MADV_DONTNEED, start, min(end, len(m)) - start)

    def release_tensor(self, name: str) -> None:
        """`release` the mapped pages of tensor `name`."""
        info = self.tensor(name)
        self.release(info.offset, info.n_bytes)

    def close(self):
        mm, self._mm = self._mm, None
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            try:
                mm._mmap.close()
            except BufferError:  # views still alive; the map goes when they do
                pass
