"""Bad input: the typed exception in the API, one line and exit code 2 in the CLI (never a traceback)."""

import subprocess
import sys

import gguf
import numpy as np
import pytest

import gguf_flash
from gguf_flash.errors import (ContextOverflowError, GGUFFormatError, InvalidArgumentError,
                               ModelFetchError, UnsupportedModelError)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gguf_flash.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gguf-flash: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_llama_path):
    d = tmp_path_factory.mktemp("bad")
    data = tiny_llama_path.read_bytes()
    (d / "notgguf.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    (d / "truncated.gguf").write_bytes(data[: len(data) // 2])
    # unknown architecture: a well-formed GGUF whose general.architecture is not implemented
    w = gguf.GGUFWriter(d / "mamba.gguf", "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    # unknown tensor type: patch the first tensor's ggml type to 99
    from gguf_flash.gguf_file import GGUFFile
    name = next(iter(GGUFFile(tiny_llama_path).tensors)).encode()
    buf = bytearray(data)
    at = buf.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(buf[at:at + 4], "little")
    buf[at + 4 + 8 * n_dims: at + 8 + 8 * n_dims] = (99).to_bytes(4, "little")
    (d / "badtype.gguf").write_bytes(bytes(buf))
    return d


@pytest.mark.parametrize("fname,exc,needle", [
    ("notgguf.gguf", GGUFFormatError, "not a GGUF"),
    ("truncated.gguf", GGUFFormatError, "truncated"),
    ("mamba.gguf", UnsupportedModelError, "unsupported architecture 'mamba'"),
    ("badtype.gguf", UnsupportedModelError, "unknown ggml type 99"),
    ("missing.gguf", ModelFetchError, "no such file"),
])
def test_bad_model_file(bad_files, fname, exc, needle):
    path = bad_files / fname
    with pytest.raises(exc, match=needle):
        gguf_flash.load(path)
    proc = cli("run", "-m", path, "-p", "hi", "-n", "4")
    assert_one_line_error(proc, needle, fname)


def test_prompt_longer_than_context(tiny_llama_path):
    llm = gguf_flash.load(tiny_llama_path, n_ctx=16)
    with pytest.raises(ContextOverflowError, match="context"):
        llm.generate(list(range(3, 40)), n_predict=2)
    proc = cli("run", "-m", tiny_llama_path, "-c", "16", "-p", "hello world " * 20, "-n", "2")
    assert_one_line_error(proc, "context")


def test_bad_arguments(tiny_llama_path, tmp_path):
    assert_one_line_error(cli("run", "-m", tiny_llama_path, "-p", "x", "--temp", "-1"), "--temp")
    assert_one_line_error(cli("run", "-m", tiny_llama_path, "-p", "x", "--top-p", "0"), "--top-p")
    assert_one_line_error(cli("run", "-m", tiny_llama_path, "-f", tmp_path / "nope.txt"), "nope.txt")
    assert_one_line_error(cli("run", "-m", tiny_llama_path), "-p")
    assert_one_line_error(cli("fetch", "no-such-model"), "unknown model name")
    with pytest.raises(InvalidArgumentError):
        gguf_flash.load(tiny_llama_path).generate("x", n_predict=-2)



@pytest.mark.parametrize("tokenizer", ["gpt2", "llama"])
def test_vocabulary_of_empty_strings_names_the_file(tmp_path, tokenizer):
    """Every tokenizer.ggml.tokens string empty: llama.cpp renames them "[EMPTY_i]", which left the BPE
    tokenizer dropping all text (the prompt became no tokens: "empty prompt", naming nothing). Refused
    at load, naming the file."""
    from fuzz_gguf import rewrite
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / "ok.gguf", n_layer=1, n_vocab=300, tokenizer=tokenizer)
    empty = ([""] * 300, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    bad = rewrite(src, tmp_path / "empty-vocab.gguf", meta={"tokenizer.ggml.tokens": empty})
    with pytest.raises(GGUFFormatError, match=r"empty-vocab\.gguf: tokenizer\.ggml\.tokens: all 300 tokens are empty"):
        gguf_flash.load(bad)
    assert_one_line_error(cli("run", "-m", bad, "-p", "hello", "-n", "2"), str(bad), "all 300 tokens are empty")


def test_text_the_vocabulary_cannot_spell_names_the_file(tmp_path):
    """Only the special tokens have text: a prompt encodes to nothing, which is refused naming the model
    file (not run as an empty prompt); an empty prompt (file) names the prompt file and the model."""
    from fuzz_gguf import rewrite
    from gguf_flash.gguf_file import GGUFFile
    from gguf_flash.synthetic import write_synthetic
    src = write_synthetic(tmp_path / "ok.gguf", n_layer=1, n_vocab=300, tokenizer="gpt2")
    f = GGUFFile(src)
    kept = [t if ty == gguf.TokenType.CONTROL else "" for t, ty in
            zip(f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.token_type"))]
    f.close()
    assert 0 < sum(map(bool, kept)) < 10
    bad = rewrite(src, tmp_path / "specials-only.gguf",
                  meta={"tokenizer.ggml.tokens": (kept, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)})
    with pytest.raises(GGUFFormatError, match=r"specials-only\.gguf: the vocabulary encodes none of the text"):
        gguf_flash.load(bad).generate("hello", n_predict=2)
    proc = cli("run", "-m", bad, "-p", "hello", "-n", "2")    # a warning first: its merges are dropped
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and lines[0].startswith("dropping "), proc.stderr
    assert lines[1:] == [f"gguf-flash: error: {bad}: the vocabulary encodes none of the text (5 characters): its "
                         f"tokens cannot spell it"], proc.stderr
    prompt = tmp_path / "empty-prompt.txt"
    prompt.write_text("")
    assert_one_line_error(cli("run", "-m", src, "-f", prompt, "-n", "2"), f"{prompt}: the prompt is empty",
                          str(src))
