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


def tokenizer_from_gguf(f):
    """The file's tokenizer. Each one computes llama.cpp's end-of-generation set (`eog_ids`)."""
    kind = f.get("tokenizer.ggml.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFFormatError(f"{f.path}: no tokenizer in the file (tokenizer.ggml.model/tokens)")
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
