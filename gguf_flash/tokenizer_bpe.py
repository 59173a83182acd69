"""The 'gpt2' (byte-level BPE) tokenizer built from GGUF metadata, matching llama.cpp.

GGUF files with `tokenizer.ggml.model = "gpt2"` carry the vocabulary as strings in GPT-2's
byte-to-unicode alphabet, the merges as "left right" strings (rank = list position), a type per token
and `tokenizer.ggml.pre`, the name of the pre-tokenizer. llama.cpp tokenizes in three steps
(src/llama-vocab.cpp, llama_vocab::impl::tokenize for LLAMA_VOCAB_TYPE_BPE):
  1. tokenizer_st_partition: cut the text at the literal text of special tokens (control, user-defined
     and unknown ones when parse_special; only user-defined ones otherwise), longest token first;
  2. each remaining text fragment is split by the pre-tokenizer's regexes (llm_tokenizer_bpe; the
     regexes are applied one after another, each to the pieces the previous one left, and text between
     matches stays a piece of its own), byte-encoded, and merged by rank;
  3. BOS/EOS are added around the result when add_special and the metadata says so.
Step 2 runs in the `tokenizers` library (Rust): Split pre-tokenizers with llama.cpp's regexes,
ByteLevel without its own regex, and models.BPE over the GGUF vocab and merges. Steps 1 and 3 are
here, written after llama.cpp. Detokenizing is a precomputed bytes table (token_to_piece) plus
llama.cpp's clean_spaces pass for the pre-tokenizers that enable it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from .errors import GGUFFormatError, UnsupportedModelError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Token types (GGUF tokenizer.ggml.token_type, llama.h llama_token_type) and the attribute bits
# llama.cpp derives from them (llama_token_attr); only the bits this module reads.
# ---------------------------------------------------------------------------------------------------
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

_TYPE_TO_ATTR = np.zeros(8, dtype=np.int32)  # (8,) int32; types outside 1..6 -> 0 (undefined)
_TYPE_TO_ATTR[TOKEN_TYPE_NORMAL] = ATTR_NORMAL
_TYPE_TO_ATTR[TOKEN_TYPE_UNKNOWN] = ATTR_UNKNOWN
_TYPE_TO_ATTR[TOKEN_TYPE_CONTROL] = ATTR_CONTROL
_TYPE_TO_ATTR[TOKEN_TYPE_USER_DEFINED] = ATTR_USER_DEFINED
_TYPE_TO_ATTR[TOKEN_TYPE_UNUSED] = ATTR_UNUSED
_TYPE_TO_ATTR[TOKEN_TYPE_BYTE] = ATTR_BYTE

# Token texts llama.cpp treats as end-of-generation and forces to CONTROL whatever their type says
# (llama_vocab::impl::load, "auto-detect special tokens by text"), plus the FIM names it also forces.
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)
_FIM_TEXTS = (
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
    "<REPO>", "<reponame>", "<|file_sep|>",
)

# ---------------------------------------------------------------------------------------------------
# Pre-tokenizers: llama.cpp's regexes per tokenizer.ggml.pre (llm_tokenizer_bpe constructor) and the
# flags llama_vocab::impl::load sets beside them.
# ---------------------------------------------------------------------------------------------------
# GPT-2's regex. llama.cpp runs it with a hand-written matcher (unicode_regex_split_custom_gpt2) that
# also implements the trailing `|\s+` alternative of the original pattern, so it is appended here.
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3: contractions case-insensitive, numbers in groups of up to 3 digits.
_RE_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: the Llama 3 pattern with single digits.
_RE_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer type: its regexes and the vocab flags that come with it."""

    name: str  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_* without the prefix
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is emitted whole (llama3)
    clean_spaces: bool = True  # detokenize removes " ?", " ," ... (llama.cpp default for BPE)
    add_bos: bool = False  # llama.cpp's add_bos when the GGUF has no add_bos_token key


_LLAMA3 = PreTokenizer("LLAMA3", (_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_DBRX = PreTokenizer("DBRX", (_RE_LLAMA3,))
_GPT2 = PreTokenizer("GPT2", (_RE_GPT2,))
_SMOLLM = PreTokenizer("SMOLLM", (r"\p{N}", _RE_GPT2), clean_spaces=False)
_STARCODER = PreTokenizer("STARCODER", (r"\p{N}", _RE_GPT2))
_QWEN2 = PreTokenizer("QWEN2", (_RE_QWEN2,), clean_spaces=False)
_STABLELM2 = PreTokenizer("STABLELM2", (_RE_QWEN2,))
_DEFAULT = PreTokenizer("DEFAULT", (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))

# tokenizer.ggml.pre value -> pre-tokenizer (the names llama_vocab::impl::load maps to these types
# with the same flags; a name not listed here is refused rather than guessed).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _DBRX),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "exaone4"), _GPT2),
    "smollm": _SMOLLM,
    "command-r": PreTokenizer("COMMAND_R", (r"\p{N}", _RE_GPT2), clean_spaces=False),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva-7b"), _STARCODER),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2),
    **dict.fromkeys(("stablelm2", "megrez"), _STABLELM2),
}


def pre_tokenizer_for(pre: str | None) -> PreTokenizer:
    """The pre-tokenizer for a tokenizer.ggml.pre value; a missing value means 'default' (as llama.cpp)."""
    if not pre:
        log.warning("GGUF has no tokenizer.ggml.pre; using 'default' like llama.cpp (quality may suffer)")
        return _DEFAULT
    try:
        return PRE_TOKENIZERS[pre]
    except KeyError:
        raise UnsupportedModelError(
            f"BPE pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        ) from None


# ---------------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode alphabet (unicode.cpp unicode_byte_to_utf8_map): printable Latin-1 bytes map to
# themselves, the other 68 bytes to U+0100.. in byte order.
# ---------------------------------------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
# str.translate table that turns a byte-level token string into one char per byte (then latin-1
# encodes it to bytes). Latin-1 chars that are not in the alphabet go to U+FFFF, which latin-1 cannot
# encode, so they take the slow path below like any other stray character.
_DECODE_TRANSLATE = {ord(c): chr(b) for c, b in UNICODE_TO_BYTE.items()}
_DECODE_TRANSLATE.update({cp: "\uffff" for cp in range(256) if chr(cp) not in UNICODE_TO_BYTE})


def _byte_decode_slow(text: str) -> bytes:
    """llama.cpp's llama_decode_text, character by character, including its [UNK_BYTE_0x..] marker."""
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


def byte_decode(text: str) -> bytes:
    """The raw bytes a byte-level token string stands for."""
    try:
        return text.translate(_DECODE_TRANSLATE).encode("latin-1")
    except UnicodeEncodeError:
        return _byte_decode_slow(text)


# ---------------------------------------------------------------------------------------------------
# llama.cpp's detokenize clean_spaces passes (llama_vocab::impl::detokenize), on bytes.
# ---------------------------------------------------------------------------------------------------
_RE_SPACE_BEFORE_PUNCT = re.compile(rb" (?=[?!.,])")


def clean_spaces(text: bytes) -> bytes:
    """Remove spaces before ?!., , around a lone apostrophe, and before 's 'm 're 've (llama.cpp)."""
    # pass 1: " ?", " !", " .", " ," -> drop the space
    t = _RE_SPACE_BEFORE_PUNCT.sub(b"", text)
    # pass 2: " ' " -> "'" (llama.cpp blanks the following space to NUL, so it cannot start another match)
    src = bytearray(t)
    out = bytearray(src[:1])
    i = 1
    while i < len(src):
        x = src[i]
        if x == 0x27 and i + 1 < len(src) and src[i - 1] == 0x20 and src[i + 1] == 0x20:
            del out[-1]
            i += 1
            src[i] = 0
        out.append(x)
        i += 1
    # pass 3: " 's", " 'm", " 're", " 've" -> drop the space (" 't", " 'd", " 'll" keep it)
    src = bytes(out)
    out = bytearray(src[:1])
    n = len(src)
    for i in range(1, n):
        x = src[i]
        if src[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = src[i + 1]
            if x1 in b"sm":
                del out[-1]
            elif i + 2 < n and src[i + 1:i + 3] in (b"re", b"ve"):
                del out[-1]
        out.append(x)
    return bytes(out)


def _split_merge(merge: str) -> tuple[str, str] | None:
    # llama.cpp splits at the first space after position 0 (word.find(' ', 1)).
    pos = merge.find(" ", 1)
    return None if pos < 0 else (merge[:pos], merge[pos + 1:])


# ---------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------
class BPETokenizer:
    """Byte-level BPE tokenizer with llama.cpp's pre-tokenizers and special-token handling."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: np.ndarray, *, pre: str,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None, pad_id: int | None,
                 add_bos: bool, add_eos: bool, eot_id: int | None = None):
        self.pre = pre_tokenizer_for(pre)
        n_vocab = len(tokens)
        token_types = np.asarray(token_types)  # (n_vocab,) int
        if token_types.shape != (n_vocab,):
            raise GGUFFormatError(f"token_type has shape {token_types.shape}, expected ({n_vocab},)")
        # llama.cpp renames empty tokens and refuses duplicates.
        if not all(tokens):
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        tokens = list(tokens)
        vocab = dict(zip(tokens, range(n_vocab)))
        if len(vocab) != n_vocab:
            raise GGUFFormatError(f"duplicate tokens in the vocabulary ({n_vocab - len(vocab)} repeats)")

        self.n_vocab = n_vocab
        self.tokens = tokens
        self.bos_id = self._check_id(bos_id, "bos")
        self.eos_id = self._check_id(eos_id, "eos")
        self.unk_id = self._check_id(unk_id, "unk")
        self.pad_id = self._check_id(pad_id, "pad")
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        if self.add_bos and self.bos_id is None:
            raise GGUFFormatError("add_bos_token is true, but there is no BOS token id")
        if self.add_eos and self.eos_id is None:
            raise GGUFFormatError("add_eos_token is true, but there is no EOS token id")

        # Attributes, with llama.cpp's text-based fix-ups: EOG/FIM-looking tokens become CONTROL.
        types = np.clip(token_types.astype(np.int64), 0, len(_TYPE_TO_ATTR) - 1)
        self.attr = _TYPE_TO_ATTR[types]  # (n_vocab,) int32 llama_token_attr bits
        for text in (*_EOG_TEXTS, *_FIM_TEXTS):
            tid = vocab.get(text)
            if tid is not None and not self.attr[tid] & ATTR_CONTROL:
                log.warning("token %d %r looks like a control token; treating it as one (llama.cpp)",
                            tid, text)
                self.attr[tid] |= ATTR_CONTROL
        if eot_id is None:
            # llama.cpp finds EOT by text when the GGUF does not name it; with several candidates its
            # pick follows unordered_map order, so take the first in list order (<|eot_id|>, <|im_end|>
            # before <|endoftext|>). Generation should stop on any of eog_ids anyway.
            eot_id = next((vocab[t] for t in _EOT_TEXTS if t in vocab), None)
        self.eot_id = self._check_id(eot_id, "eot")
        self.eog_ids = frozenset(
            [vocab[t] for t in _EOG_TEXTS if t in vocab]
            + [i for i in (self.eos_id, self.eot_id) if i is not None])

        # Special tokens to cut out before BPE, longest text first (tokenizer_st_partition); ties
        # by id (llama.cpp's std::sort leaves their order unspecified).
        special = np.nonzero(self.attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0]
        special = sorted(special.tolist(), key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        self._special_all = [(tokens[i], i) for i in special]
        self._special_user = [(tokens[i], i) for i in special
                              if not self.attr[i] & (ATTR_CONTROL | ATTR_UNKNOWN)]

        # Bytes each token adds to the text (token_to_piece), for special=False and special=True.
        self._pieces = self._build_pieces()  # list[bytes], special=True
        hidden = np.nonzero(self.attr & (ATTR_CONTROL | ATTR_UNKNOWN))[0]
        self._pieces_plain = list(self._pieces)  # list[bytes], special=False
        for i in hidden.tolist():
            self._pieces_plain[i] = b""

        self._hf = self._build_hf(vocab, merges)

    # -- construction helpers -----------------------------------------------------------------------
    def _check_id(self, tid: int | None, what: str) -> int | None:
        if tid is None or tid < 0:
            return None
        if tid >= self.n_vocab:
            log.warning("%s token id %d is outside the vocabulary (%d); ignoring it", what, tid, self.n_vocab)
            return None
        return int(tid)

    def _build_pieces(self) -> list[bytes]:
        """token_to_piece(id, special=True) for every token (llama.cpp, LLAMA_VOCAB_TYPE_BPE)."""
        tokens, attr = self.tokens, self.attr
        pieces = [b""] * self.n_vocab  # unused / undefined tokens: llama.cpp writes nothing
        special = attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED)
        for i in np.nonzero(special)[0].tolist():
            pieces[i] = tokens[i].encode("utf-8")  # special tokens are stored as plain text
        for i in np.nonzero((special == 0) & (attr & ATTR_BYTE != 0) & (attr & ATTR_NORMAL == 0))[0].tolist():
            pieces[i] = bytes([int(tokens[i][3:5], 16)])  # "<0xXX>"
        normal = np.nonzero((special == 0) & (attr & ATTR_NORMAL != 0))[0].tolist()
        texts = [tokens[i] for i in normal]
        # Fast path: one translate + latin-1 encode over all normal tokens (one char per byte), then
        # slice; any stray character sends every token through byte_decode instead.
        try:
            blob = "".join(texts).translate(_DECODE_TRANSLATE).encode("latin-1")
        except UnicodeEncodeError:
            for i, text in zip(normal, texts):
                pieces[i] = byte_decode(text)
            return pieces
        ends = np.cumsum([len(t) for t in texts]).tolist()
        start = 0
        for i, end in zip(normal, ends):
            pieces[i] = blob[start:end]
            start = end
        return pieces

    def _build_hf(self, vocab: dict[str, int], merges: Sequence[str]) -> Tokenizer:
        pairs = [tuple(m.split(" ", 1)) if m[:1] != " " else _split_merge(m) for m in merges]
        # tokenizers requires both parts and the result of every merge to be tokens (it panics on a
        # missing result); llama.cpp would merge anyway and fall back to byte tokens. Converted
        # vocabularies come from tokenizer.json files that obey the rule, so such merges are dropped.
        ok = [p for p in pairs if p is not None and len(p) == 2
              and p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
        if len(ok) != len(merges):
            log.warning("dropping %d of %d merges whose parts or result are not tokens",
                        len(merges) - len(ok), len(merges))
        model = models.BPE(vocab, ok, ignore_merges=self.pre.ignore_merges)
        tk = Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in self.pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return tk

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "BPETokenizer":
        """Build from GGUF key/values (plain Python values), with llama.cpp's defaults for missing keys."""
        model = md.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedModelError(
                f"tokenizer.ggml.model {model!r} is not a byte-level BPE ('gpt2') tokenizer")
        pre = md.get("tokenizer.ggml.pre")
        tokens = md["tokenizer.ggml.tokens"]
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            types = np.full(len(tokens), TOKEN_TYPE_NORMAL, dtype=np.int32)
        if "tokenizer.ggml.merges" not in md:
            raise GGUFFormatError("cannot find tokenizer merges in model file")
        return cls(
            tokens, md["tokenizer.ggml.merges"], np.asarray(types), pre=pre,
            bos_id=md.get("tokenizer.ggml.bos_token_id", 11),  # llama.cpp's BPE defaults
            eos_id=md.get("tokenizer.ggml.eos_token_id", 11),
            unk_id=md.get("tokenizer.ggml.unknown_token_id"),
            pad_id=md.get("tokenizer.ggml.padding_token_id"),
            add_bos=md.get("tokenizer.ggml.add_bos_token", pre_tokenizer_for(pre).add_bos),
            add_eos=md.get("tokenizer.ggml.add_eos_token", False),
            eot_id=md.get("tokenizer.ggml.eot_token_id"),
        )

    # -- encoding -----------------------------------------------------------------------------------
    def partition(self, text: str, parse_special: bool = True) -> list[str | int]:
        """Cut special-token text out of `text`: a list of raw fragments (str) and token ids (int)."""
        frags: list[str | int] = [text] if text else []
        for s, tid in (self._special_all if parse_special else self._special_user):
            if not any(isinstance(f, str) and s in f for f in frags):
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or s not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(s)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def pre_tokenize(self, text: str) -> list[str]:
        """The words BPE sees for one raw fragment, as text (for tests and debugging)."""
        words = self._hf.pre_tokenizer.pre_tokenize_str(text)
        return [byte_decode(w).decode("utf-8", errors="replace") for w, _ in words]

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_id)
        for frag in self.partition(text, parse_special):
            if isinstance(frag, int):
                ids.append(frag)
            else:
                ids.extend(self._hf.encode(frag, add_special_tokens=False).ids)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    # -- decoding -----------------------------------------------------------------------------------
    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The raw bytes this token adds to the text; control tokens give b"" unless special."""
        return (self._pieces if special else self._pieces_plain)[token_id]

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """llama.cpp's detokenize (remove_special=False): pieces joined, clean_spaces if the pre sets it."""
        table = self._pieces if special else self._pieces_plain
        raw = b"".join([table[i] for i in ids])
        if self.pre.clean_spaces:
            raw = clean_spaces(raw)
        return raw.decode("utf-8", errors="replace")
