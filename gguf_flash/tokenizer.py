"""Pick the tokenizer a GGUF names (`tokenizer.ggml.model`), and stream-safe detokenization.

'gpt2' -> byte-level BPE (tokenizer_bpe.py, the `tokenizers` library); 'llama' -> SentencePiece
(tokenizer_spm.py, the `sentencepiece` library, with a ModelProto built from the GGUF vocabulary).
"""

from __future__ import annotations

import numpy as np

from .errors import GGUFFormatError, UnsupportedModelError


def _opt_id(f, key):
    v = f.get(key)
    return None if v is None else int(v)


_ID_KEYS = ("bos", "eos", "unknown", "padding", "eot", "eom", "sep", "cls", "mask")
_FLAG_KEYS = ("add_bos_token", "add_eos_token", "add_space_prefix")


def check_tokenizer_types(f):
    """The tokenizer keys have the GGUF types the tokenizers read (a hostile file may hold anything):
    string lists, numeric arrays, integer ids, boolean flags."""
    def bad(key, want):
        raise GGUFFormatError(f"{f.path}: metadata {key} is not {want}")

    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        v = f.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            bad(key, "an array of strings")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        v = f.get(key)
        if v is not None and not (isinstance(v, np.ndarray) and v.dtype.kind in "iuf" and v.ndim == 1):
            bad(key, "an array of numbers")
    for name in _ID_KEYS:
        v = f.get(f"tokenizer.ggml.{name}_token_id")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            bad(f"tokenizer.ggml.{name}_token_id", "an integer")
    for name in _FLAG_KEYS:
        v = f.get(f"tokenizer.ggml.{name}")
        if v is not None and not isinstance(v, (bool, int)):
            bad(f"tokenizer.ggml.{name}", "a boolean")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        v = f.get(key)
        if v is not None and not isinstance(v, str):
            bad(key, "a string")


def tokenizer_from_gguf(f):
    """The file's tokenizer. Each one computes llama.cpp's end-of-generation set (`eog_ids`)."""
    kind = f.get("tokenizer.ggml.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFFormatError(f"{f.path}: no tokenizer in the file (tokenizer.ggml.model/tokens)")
    check_tokenizer_types(f)
    if not any(tokens):   # llama.cpp renames empty tokens "[EMPTY_i]": every piece of text would be lost
        raise GGUFFormatError(f"{f.path}: tokenizer.ggml.tokens: " + (
            f"all {len(tokens)} tokens are empty strings" if tokens else "the vocabulary is empty")
            + " (no text can be encoded or decoded)")
    try:
        if kind == "gpt2":
            from .tokenizer_bpe import BPETokenizer
            return BPETokenizer.from_metadata(f.meta)
        if kind == "llama":
            from .tokenizer_spm import SPMTokenizer
            n = len(tokens)
            scores, types = f.get("tokenizer.ggml.scores"), f.get("tokenizer.ggml.token_type")
            return SPMTokenizer(
                tokens, np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32),
                np.ones(n, np.int32) if types is None else np.asarray(types, np.int32),
                bos_id=_opt_id(f, "tokenizer.ggml.bos_token_id"), eos_id=_opt_id(f, "tokenizer.ggml.eos_token_id"),
                unk_id=_opt_id(f, "tokenizer.ggml.unknown_token_id"),
                pad_id=_opt_id(f, "tokenizer.ggml.padding_token_id"),
                eot_id=_opt_id(f, "tokenizer.ggml.eot_token_id"),
                add_bos=bool(f.get("tokenizer.ggml.add_bos_token", True)),
                add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
                add_space_prefix=bool(f.get("tokenizer.ggml.add_space_prefix", True)))
    except (UnsupportedModelError, GGUFFormatError) as e:
        raise type(e)(f"{f.path}: {e}") from None
    raise UnsupportedModelError(f"{f.path}: unsupported tokenizer model {kind!r} (supported: gpt2, llama)")


class StreamDecoder:
    """Turns token ids into text pieces as they arrive; a UTF-8 character split across tokens is
    emitted once complete."""

    def __init__(self, tokenizer, special: bool = False):
        self.tok, self.special, self.pending = tokenizer, special, b""

    def push(self, token_id: int) -> str:
        self.pending += self.tok.token_bytes(token_id, special=self.special)
        # keep an incomplete trailing sequence (at most 3 bytes) for the next token
        for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
            try:
                text = self.pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.pending = self.pending[cut:]
            return text
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
