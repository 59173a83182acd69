"""The fast GGUF reader against gguf.GGUFReader, and its refusals of bad files."""

import numpy as np
import pytest
import gguf

from gguf_flash.errors import GGUFFormatError, UnsupportedModelError
from gguf_flash.gguf_file import GGUFFile


def _field_value(field):
    v = field.contents()
    return v


def test_matches_gguf_reader_on_synthetic(tiny_llama_path):
    ours, theirs = GGUFFile(tiny_llama_path), gguf.GGUFReader(tiny_llama_path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.meta) == keys
    for k in keys:
        a, b = ours.meta[k], _field_value(theirs.fields[k])
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, np.asarray(b)), k
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-7), k
        else:
            assert a == b, k
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == int(t.tensor_type) and list(info.ne) == [int(x) for x in t.shape]
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes
        assert np.array_equal(ours.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_real_model_header(smollm2_path):
    f = GGUFFile(smollm2_path)
    assert f.arch == "llama" and f.version == 3 and len(f.tensors) == 272
    assert len(f.meta) == 33  # models.md: KV count 33
    assert f.data_start == 1_785_664 and f.alignment == 32
    assert len(f.get("tokenizer.ggml.tokens")) == 49152 and len(f.get("tokenizer.ggml.merges")) == 48900
    assert f.raw("token_embd.weight").shape == (49152, 612)             # Q8_0: 18 blocks of 34 B
    assert f.raw("blk.0.ffn_down.weight").shape == (576, 960)           # Q4_1: 48 blocks of 20 B
    assert not f.raw("blk.0.ffn_down.weight").flags.writeable
    assert f.array("blk.0.attn_norm.weight").dtype == np.float32


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, this is not a model file at all")
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        GGUFFile(p)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="empty"):
        GGUFFile(empty)
    with pytest.raises(GGUFFormatError, match="no such file"):
        GGUFFile(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [30, 2000, -100])
def test_truncated(tiny_llama_path, tmp_path, keep):
    data = tiny_llama_path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(GGUFFormatError, match="truncated"):
        GGUFFile(p)


def test_unknown_tensor_type(tiny_llama_path, tmp_path):
    f = GGUFFile(tiny_llama_path)
    data = bytearray(tiny_llama_path.read_bytes())
    # the type field of the first tensor info: after its name, n_dims and dims
    name = next(iter(f.tensors)).encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    p = tmp_path / "badtype.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match="unknown ggml type 99"):
        GGUFFile(p)


def _gguf_with_strings(path, strings: list[bytes]):
    """A GGUF v3 with no tensors and one string-array key, written byte by byte."""
    import struct
    body = b"".join(struct.pack("<Q", len(s)) + s for s in strings)
    key = b"tokenizer.ggml.tokens"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<IIQ", 9, 8, len(strings)) + body)
    return path


@pytest.mark.parametrize("broken", [None, "split", "invalid"])
def test_large_string_array(tmp_path, broken):
    """The bulk vocabulary path (>= 4096 strings) decodes exactly like one string at a time, including
    empty strings, multi-byte characters, a character split across two strings and invalid bytes."""
    rng = np.random.default_rng(0)
    pool = [b"", b"a", b"\xe2\x96\x81the", "é".encode(), "日本".encode(), "🦙".encode(), b"<0x0A>"]
    strings = [pool[i] + str(k).encode() * int(rng.integers(0, 2)) for k, i in
               enumerate(rng.integers(0, len(pool), 5000))]
    if broken == "split":
        strings[100:102] = [b"x\xe2\x82", b"\xacy"]               # "€" cut in two
    elif broken == "invalid":
        strings[200] = b"\xff\xfe"
    f = GGUFFile(_gguf_with_strings(tmp_path / "s.gguf", strings))
    assert f.meta["tokenizer.ggml.tokens"] == [s.decode("utf-8", errors="replace") for s in strings]


def test_large_string_array_truncated(tmp_path):
    p = _gguf_with_strings(tmp_path / "s.gguf", [b"abc"] * 5000)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(GGUFFormatError, match="truncated"):
        GGUFFile(p)
