"""The 'llama' (SentencePiece) tokenizer of a GGUF file, reproducing llama.cpp's `llm_tokenizer_spm`.

llama.cpp (src/llama-vocab.cpp) tokenizes an SPM vocabulary in three steps, and so does this module:
1. `tokenizer_st_partition`: split the raw text on the texts of "special" tokens, longest text first.
   With parse_special, control + user-defined + unknown tokens are split out; without it only the
   user-defined ones (Gemma's runs of spaces / newlines / tabs and its HTML tags are user-defined, so
   this matters even for plain text).
2. Each remaining text fragment gets a leading space if `add_space_prefix` and the fragment is the first
   one or follows a special token (`is_prev_special`), then ' ' is escaped to U+2581.
3. `llm_tokenizer_spm_session`: split into UTF-8 characters, repeatedly merge the adjacent pair whose
   concatenation is a vocabulary token of highest score (ties: leftmost), and emit each final symbol as
   its token or, if it is not one, as <0xNN> byte tokens (byte fallback).

Step 3 is the SentencePiece BPE algorithm (bpe_model.cc, which llama.cpp ported), so it runs in the
sentencepiece library from a ModelProto we serialize by hand from the GGUF arrays (the shipped
`sentencepiece_model_pb2` needs protobuf, which is not a dependency; the wire format is five fields).
llama.cpp merges into *any* vocabulary text, so every token is a NORMAL piece there except byte tokens
(BYTE, needed for byte fallback) and the unknown token (sentencepiece requires one UNKNOWN piece). A
fragment that contains the text of one of those (e.g. a literal "<0x0A>" or "<unk>") could be merged
differently, so it goes through `spm_merge_slow`, a direct port of llama.cpp's session, instead; that
port is also the whole tokenizer when sentencepiece rejects the vocabulary.
"""

import heapq
import logging

import numpy as np
import sentencepiece

from .errors import GGUFFormatError, InvalidArgumentError, UnsupportedModelError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# GGUF token types (gguf-py constants.TokenType) and the pieces of the SentencePiece wire format
# ---------------------------------------------------------------------------------------------------
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# sentencepiece_model.proto: ModelProto.SentencePiece.Type
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_BYTE = 1, 2, 3, 6

# llama-vocab.cpp marks tokens with these texts as control (end-of-generation / FIM) even when the GGUF
# says otherwise ("control-looking token ... its type will be overridden").
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|eom_id|>")
_CONTROL_LOOKING = _EOG_TEXTS + (
    "<|fim_prefix|>", "<fim-prefix>", "<｜fim▁begin｜>", "<PRE>", "<|fim_suffix|>", "<fim-suffix>",
    "<｜fim▁hole｜>", "<SUF>", "<|fim_middle|>", "<fim-middle>", "<｜fim▁end｜>", "<MID>", "<|fim_pad|>",
    "<fim-pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<|file_sep|>",
    "<｜end▁of▁sentence｜>")

SPACE_ESCAPE = "\u2581"  # llama_escape_whitespace: ' ' -> U+2581 LOWER ONE EIGHTH BLOCK


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # protobuf writes negative int32 as 10-byte two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field_varint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _field_bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _scatter_varint(out: np.ndarray, pos: np.ndarray, value: np.ndarray, width: np.ndarray) -> None:
    """Write varint `value[i]` (1..3 bytes, `width[i]` of them) at `out[pos[i]:]`, all i at once."""
    for k in range(3):
        sel = width > k
        byte = (value[sel] >> (7 * k)) & 0x7F
        byte |= np.where(width[sel] > k + 1, 0x80, 0)
        out[pos[sel] + k] = byte


def _varint_width(n: np.ndarray) -> np.ndarray:
    return 1 + (n >= 1 << 7).astype(np.int64) + (n >= 1 << 14).astype(np.int64)


def _utf8_lengths(texts: list[str]) -> tuple[bytes, np.ndarray]:
    """All texts UTF-8 encoded back to back, and each one's byte length, without a per-text loop."""
    joined = "".join(texts)
    cps = np.frombuffer(joined.encode("utf-32-le"), np.uint32)          # (n_chars,) code points
    cp_bytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    n_chars = np.fromiter(map(len, texts), np.int64, len(texts))      # (n,) all > 0
    first = np.zeros(len(texts), np.int64)
    np.cumsum(n_chars[:-1], out=first[1:])
    return joined.encode("utf-8"), np.add.reduceat(cp_bytes, first)


def serialize_model_proto(texts: list[str], scores: np.ndarray, sp_types: np.ndarray, *,
                          unk_id: int) -> bytes:
    """A serialized sentencepiece ModelProto: BPE, byte fallback, identity normalizer, no escaping.

    The 262,144 repeated `pieces` (field 1: {1: piece, 2: float score, 3: type}) are laid out with numpy
    because a Python loop over them takes ~0.5 s; the two small specs are written field by field.
    Field numbers are those of sentencepiece_model.proto. Every text must be non-empty.
    """
    n = len(texts)
    utf8, plen = _utf8_lengths(texts)                                   # (n,) piece bytes
    if n and plen.max() >= 1 << 21:
        raise UnsupportedModelError("a token text is longer than 2 MiB")
    pw = _varint_width(plen)
    inner = 1 + pw + plen + 1 + 4 + 1 + 1                               # piece, score, type fields
    iw = _varint_width(inner)
    rec = 1 + iw + inner                                                # (n,) bytes per record
    start = np.zeros(n + 1, np.int64)
    np.cumsum(rec, out=start[1:])
    out = np.empty(int(start[-1]), np.uint8)                            # (total,) uint8
    s = start[:-1]
    out[s] = 0x0A                                                       # ModelProto.pieces, LEN
    _scatter_varint(out, s + 1, inner, iw)
    p0 = s + 1 + iw
    out[p0] = 0x0A                                                      # SentencePiece.piece, LEN
    _scatter_varint(out, p0 + 1, plen, pw)
    ps = p0 + 1 + pw                                                    # (n,) first piece byte
    blob = np.frombuffer(utf8, np.uint8)
    pstart = np.zeros(n, np.int64)
    np.cumsum(plen[:-1], out=pstart[1:])
    out[np.repeat(ps - pstart, plen) + np.arange(blob.size)] = blob
    pe = ps + plen
    out[pe] = 0x15                                                      # SentencePiece.score, I32
    sb = np.ascontiguousarray(scores, dtype="<f4").view(np.uint8).reshape(n, 4)
    for k in range(4):
        out[pe + 1 + k] = sb[:, k]
    out[pe + 5] = 0x18                                                  # SentencePiece.type, VARINT
    out[pe + 6] = sp_types
    trainer = (_field_varint(3, 2)                                      # model_type = BPE
               + _field_varint(4, n)                                    # vocab_size
               + _field_varint(35, 1)                                   # byte_fallback
               + _field_varint(40, unk_id)                              # unk_id
               + _field_varint(41, -1) + _field_varint(42, -1) + _field_varint(43, -1))  # bos/eos/pad
    normalizer = (_field_bytes(1, b"identity")                          # name: no NFKC rules
                  + _field_varint(3, 0)                                 # add_dummy_prefix: done by us
                  + _field_varint(4, 0)                                 # remove_extra_whitespaces
                  + _field_varint(5, 0))                                # escape_whitespaces: done by us
    return out.tobytes() + _field_bytes(2, trainer) + _field_bytes(3, normalizer)


# ---------------------------------------------------------------------------------------------------
# llama.cpp's merge loop, in Python (the slow twin of the sentencepiece path)
# ---------------------------------------------------------------------------------------------------
def _byte_to_token(token_to_id: dict, b: int) -> int:
    """llama_vocab::byte_to_token for SPM: '<0xNN>', else the one-byte string itself."""
    tid = token_to_id.get(f"<0x{b:02X}>")
    if tid is None and b < 0x80:
        tid = token_to_id.get(chr(b))
    if tid is None:
        raise UnsupportedModelError(f"the vocabulary has no byte token for 0x{b:02X}")
    return tid


def spm_merge_slow(text: str, token_to_id: dict, scores) -> list[int]:
    """llm_tokenizer_spm_session::tokenize on an already escaped fragment (direct port, O(n log n)).

    Symbols are UTF-8 characters (Python str characters); the work queue pops the highest score, ties
    to the leftmost pair; a queued pair is stale if either side was merged since (its size changed).
    """
    n = len(text)
    if n == 0:
        return []
    start = list(range(n))            # symbol i covers text[start[i] : start[i] + size[i]]
    size = [1] * n
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    queue = []

    def try_add_bigram(left, right):
        if left == -1 or right == -1:
            return
        piece = text[start[left]:start[left] + size[left] + size[right]]
        tid = token_to_id.get(piece)
        if tid is not None:
            heapq.heappush(queue, (-float(scores[tid]), left, right, len(piece)))

    for i in range(1, n):
        try_add_bigram(i - 1, i)
    while queue:
        _, left, right, piece_len = heapq.heappop(queue)
        if size[left] == 0 or size[right] == 0 or size[left] + size[right] != piece_len:
            continue
        size[left] += size[right]
        size[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_add_bigram(prev[left], left)
        try_add_bigram(left, nxt[left])

    out = []
    i = 0
    while i != -1:
        piece = text[start[i]:start[i] + size[i]]
        tid = token_to_id.get(piece)
        if tid is not None:
            out.append(tid)
        else:  # only single characters can be non-tokens: byte fallback
            out.extend(_byte_to_token(token_to_id, b) for b in piece.encode("utf-8"))
        i = nxt[i]
    return out


# ---------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------
class SPMTokenizer:
    """llama.cpp-compatible tokenizer for GGUF `tokenizer.ggml.model = "llama"` vocabularies."""

    def __init__(self, tokens: list[str], scores: np.ndarray, token_types: np.ndarray, *, bos_id: int,
                 eos_id: int, unk_id: int | None, pad_id: int | None, add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, eot_id: int | None = None):
        n = len(tokens)
        scores = np.asarray(scores, dtype=np.float32)                   # (n_vocab,) f32
        types = np.array(token_types, dtype=np.int32)                   # (n_vocab,) i32, GGUF TokenType
        if scores.shape != (n,) or types.shape != (n,):
            raise GGUFFormatError(f"tokenizer arrays disagree: {n} tokens, {scores.shape[0]} scores, "
                                  f"{types.shape[0]} token types")
        for name, tid in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id),
                          ("eot", eot_id)):
            if tid is not None and not 0 <= tid < n:
                raise GGUFFormatError(f"{name} token id {tid} is outside the vocabulary of {n}")
        if (add_bos and bos_id is None) or (add_eos and eos_id is None):
            raise GGUFFormatError("the vocabulary adds BOS/EOS but does not say which token that is")
        # llama.cpp renames empty token texts so that they stay unique
        texts = tokens if all(tokens) else [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.n_vocab = n
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos, self.add_space_prefix = bool(add_bos), bool(add_eos), bool(add_space_prefix)
        self.scores = scores
        self.texts = texts
        self._token_to_id = None            # built on first use: hashing 262k texts costs ~0.1 s
        self._sp, self._sp_blind = self._build_sentencepiece(texts, scores, types, unk_id)
        # control-looking texts become control, as in llama_vocab::impl::load
        for text in _CONTROL_LOOKING:
            tid = self.text_to_token(text)
            if tid is not None and types[tid] != TOKEN_CONTROL:
                log.warning("token %d %r was not control-type; treating it as control", tid, text)
                types[tid] = TOKEN_CONTROL
        eog = [self.text_to_token(t) for t in _EOG_TEXTS]
        if eot_id is None:
            eot_id = next((t for t in eog if t is not None), None)
        self.eot_id = eot_id
        self.token_types = types
        # special_eog_ids: the tokens that end generation
        self.eog_ids = frozenset(i for i in [eos_id, eot_id] + eog if i is not None)
        self._bytes = [None] * n            # token_bytes cache, filled on first use
        self._special = self._special_lists(types)

    # --- vocabulary lookups ---------------------------------------------------------------------
    @property
    def token_to_id(self) -> dict[str, int]:
        """llama.cpp's token_to_id map (a later duplicate text wins)."""
        if self._token_to_id is None:
            self._token_to_id = dict(zip(self.texts, range(self.n_vocab)))
        return self._token_to_id

    def text_to_token(self, text: str) -> int | None:
        """The id of the token with exactly this text, or None."""
        if self._sp is not None:  # sentencepiece already holds a hash map of the pieces
            tid = self._sp.piece_to_id(text)
            return tid if self.texts[tid] == text else None
        return self.token_to_id.get(text)

    # --- construction helpers -------------------------------------------------------------------
    def _special_lists(self, types):
        """cache_special_tokens, longest byte length first, for parse_special true and false."""
        ids = np.flatnonzero((types == TOKEN_CONTROL) | (types == TOKEN_USER_DEFINED) | (types == TOKEN_UNKNOWN))
        # std::sort by length is not stable; ties keep id order here (only matters for overlapping
        # same-length special texts, which no known vocabulary has)
        ids = sorted(ids.tolist(), key=lambda i: -len(self.texts[i].encode("utf-8")))
        with_special = [(self.texts[i], i) for i in ids]
        user_only = [(self.texts[i], i) for i in ids if types[i] == TOKEN_USER_DEFINED]
        return {True: with_special, False: user_only}

    def _build_sentencepiece(self, texts, scores, types, unk_id):
        """The sentencepiece processor, and the texts it cannot merge into (see the module doc)."""
        sp_types = np.full(len(texts), _SP_NORMAL, np.uint8)              # (n_vocab,) SentencePiece.Type
        byte_ids = np.flatnonzero(types == TOKEN_BYTE)
        well_formed = all(len(texts[i]) == 6 and texts[i].startswith("<0x") and texts[i].endswith(">")
                          for i in byte_ids.tolist())
        if unk_id is None or len(byte_ids) != 256 or not well_formed:
            log.info("SPM vocabulary without unk or all 256 byte tokens: using the Python merge loop")
            return None, None
        sp_types[byte_ids] = _SP_BYTE
        sp_types[unk_id] = _SP_UNKNOWN
        pieces = texts
        try:
            sp = sentencepiece.SentencePieceProcessor(
                model_proto=serialize_model_proto(pieces, scores, sp_types, unk_id=unk_id))
        except RuntimeError as e:
            if len(self.token_to_id) == len(texts):
                log.info("sentencepiece rejected the vocabulary (%s): using the Python merge loop", e)
                return None, None
            # duplicate texts, which sentencepiece refuses: keep the last (llama.cpp's token_to_id
            # does the same) and hide the others behind unmatchable control pieces
            pieces = list(texts)
            for i, t in enumerate(texts):
                if self.token_to_id[t] != i:
                    pieces[i] = f"\uf8ffduplicate {i}\uf8ff"  # control: never matched in text
                    sp_types[i] = _SP_CONTROL
            try:
                sp = sentencepiece.SentencePieceProcessor(
                    model_proto=serialize_model_proto(pieces, scores, sp_types, unk_id=unk_id))
            except RuntimeError as e2:
                log.info("sentencepiece rejected the vocabulary (%s): using the Python merge loop", e2)
                return None, None
        blind = [texts[i] for i in np.flatnonzero(sp_types != _SP_NORMAL).tolist()
                 if len(texts[i]) >= 2 and pieces[i] is texts[i]]
        return sp, (frozenset(t[0] for t in blind), blind)

    # --- encoding -------------------------------------------------------------------------------
    def partition(self, text: str, parse_special: bool) -> list:
        """tokenizer_st_partition: a list of str (raw text) and int (special token id) fragments."""
        frags = [text] if text else []
        # a special text can only be in a fragment if it is in the whole text: test that once
        for special, tid in [st for st in self._special[parse_special] if st[0] in text]:
            out = []
            for f in frags:
                if isinstance(f, int) or special not in f:
                    out.append(f)
                    continue
                pos = 0
                while (hit := f.find(special, pos)) >= 0:
                    if hit > pos:
                        out.append(f[pos:hit])
                    out.append(tid)
                    pos = hit + len(special)
                if pos < len(f):
                    out.append(f[pos:])
            frags = out
        return frags

    def _merge(self, fragments: list[str]) -> list[list[int]]:
        if self._sp is None:
            return [spm_merge_slow(f, self.token_to_id, self.scores) for f in fragments]
        first_chars, blind = self._sp_blind
        fast = [i for i, f in enumerate(fragments)
                if not (any(c in f for c in first_chars) and any(t in f for t in blind))]
        result = [None] * len(fragments)
        if fast:
            for i, ids in zip(fast, self._sp.encode([fragments[i] for i in fast], num_threads=1)):
                result[i] = ids
        for i, f in enumerate(fragments):
            if result[i] is None:
                result[i] = spm_merge_slow(f, self.token_to_id, self.scores)
        return result

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama_vocab::tokenize for SPM: [BOS] fragments... [EOS] per the model's add_bos/add_eos."""
        frags = self.partition(text, parse_special)
        raw = []                      # escaped text fragments, in order
        prev_special = True           # "prefix with space if first token"
        for f in frags:
            if isinstance(f, str):
                if self.add_space_prefix and prev_special:
                    f = " " + f
                raw.append(f.replace(" ", SPACE_ESCAPE))
                prev_special = False
            else:
                prev_special = True
        merged = iter(self._merge(raw))
        out = [self.bos_id] if add_special and self.add_bos else []
        for f in frags:
            if isinstance(f, str):
                out.extend(next(merged))
            else:
                out.append(f)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    # --- decoding -------------------------------------------------------------------------------
    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """llama_vocab::token_to_piece: the bytes a token adds to the text (control/unknown: b""
        unless `special`; user-defined: its text as is; normal: U+2581 -> ' '; byte: that byte;
        unused and other types: b"")."""
        if not 0 <= token_id < self.n_vocab:
            raise InvalidArgumentError(f"token id {token_id} is outside the vocabulary of {self.n_vocab}")
        kind = self.token_types[token_id]
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            return self.texts[token_id].encode("utf-8") if special else b""
        piece = self._bytes[token_id]
        if piece is None:
            text = self.texts[token_id]
            if kind == TOKEN_USER_DEFINED:
                piece = text.encode("utf-8")
            elif kind == TOKEN_NORMAL:
                piece = text.replace(SPACE_ESCAPE, " ").encode("utf-8")
            elif kind == TOKEN_BYTE:
                piece = bytes([int(text[3:5], 16)])
            else:
                piece = b""
            self._bytes[token_id] = piece
        return piece

    def decode(self, ids: list[int], special: bool = False) -> str:
        """llama_vocab::detokenize(remove_special=false): the first token loses one leading space when
        the model adds a space prefix; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        parts = [self.token_bytes(int(t), special) for t in ids]
        if parts and self.add_space_prefix and parts[0].startswith(b" "):
            parts[0] = parts[0][1:]
        return b"".join(parts).decode("utf-8", errors="replace")
