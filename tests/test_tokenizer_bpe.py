"""The gpt2 (byte-level BPE) tokenizer against llama.cpp.

Real model: SmolLM2 (pre 'smollm') against ../shared/reference/smollm2.json (llama.cpp 0c1e57098).
Other pre-tokenizers: a tiny hand-made vocabulary (the 256-char byte alphabet plus a few merges), with
the expected splits worked out by hand from llama.cpp's llm_tokenizer_bpe regexes and
unicode_regex_split (regexes applied in sequence, text between matches kept as its own piece).
"""

import re
import time
import unicodedata

import numpy as np
import pytest

from gguf_flash.errors import UnsupportedModelError
from gguf_flash.tokenizer_bpe import BPETokenizer, clean_spaces

from conftest import GPL3, reference


def gpt2_bytes_to_unicode():
    """OpenAI's GPT-2 encoder.py bytes_to_unicode, the slow twin of the module's table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = gpt2_bytes_to_unicode()
U2B = {c: b for b, c in B2U.items()}


# ---------------------------------------------------------------------------------------------------
# SmolLM2 against llama.cpp
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_md(smollm2_path):
    from gguf_flash.gguf_file import GGUFFile
    f = GGUFFile(smollm2_path)
    return {k: v for k, v in f.meta.items() if k.startswith("tokenizer.ggml.")}


@pytest.fixture(scope="module")
def smol(smol_md):
    return BPETokenizer.from_metadata(smol_md)


@pytest.fixture(scope="module")
def ref():
    return reference("smollm2")


def test_construction_is_fast(smol_md):
    BPETokenizer.from_metadata(smol_md)  # warm imports and allocator
    wall, cpu = time.perf_counter(), time.process_time()
    tok = BPETokenizer.from_metadata(smol_md)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"BPETokenizer construction: {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU "
          f"({tok.n_vocab} tokens, {len(smol_md['tokenizer.ggml.merges'])} merges)")
    assert cpu < 1.0  # CPU time: the machine is shared, wall time is noisy


def test_metadata(smol, ref):
    assert smol.n_vocab == ref["n_vocab"] == 49152
    assert (smol.bos_id, smol.eos_id) == (ref["bos_id"], ref["eos_id"])
    assert smol.add_bos is ref["add_bos_from_metadata"] is False
    assert smol.add_eos is False
    assert smol.eot_id == 2  # <|im_end|>, found by text like llama.cpp
    assert {0, 2} <= smol.eog_ids  # <|endoftext|>, <|im_end|>


def test_reference_prompts(smol, ref):
    bad = []
    for p in ref["prompts"]:
        if smol.encode(p["text"]) != p["tokens_add_special"]:
            bad.append((p["id"], "add_special"))
        if smol.encode(p["text"], add_special=False) != p["tokens_no_bos"]:
            bad.append((p["id"], "no_bos"))
    assert not bad
    assert len(ref["prompts"]) == 7


def test_decode_round_trips(smol, ref):
    for p in ref["prompts"]:
        ids = smol.encode(p["text"])
        assert smol.decode(ids, special=True) == p["text"], p["id"]
        # without special=True the control tokens vanish, the text around them stays
        plain = p["text"]
        for t in ("<|im_start|>", "<|im_end|>"):
            plain = plain.replace(t, "")
        assert smol.decode(ids) == plain, p["id"]
        # llama.cpp's greedy continuation, detokenized with special tokens rendered
        assert smol.decode(p["greedy_ids"], special=True) == p["greedy_text"], p["id"]


def test_final_position_pieces(smol, ref):
    for p in ref["prompts"]:
        top = p["final_position_top"]
        pieces = [smol.token_bytes(i, special=True).decode("utf-8", errors="replace") for i in top["ids"]]
        assert pieces == top["pieces"], p["id"]


def test_gpl3_token_count(smol, ref):
    text = GPL3.read_text(encoding="utf-8")
    ids = smol.encode(text, add_special=False, parse_special=False)
    assert len(ids) == ref["perplexity_gpl3"]["n_text_tokens"] == 7639
    assert smol.decode(ids) == text


def test_parse_special_false_keeps_control_text(smol, ref):
    chat = next(p for p in ref["prompts"] if p["id"] == "chat_template")
    on = smol.encode(chat["text"], add_special=False, parse_special=True)
    off = smol.encode(chat["text"], add_special=False, parse_special=False)
    assert on.count(1) == 3 and on.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    assert not set(off) & set(range(17))  # ids 0..16 are SmolLM2's control tokens
    assert smol.decode(off) == chat["text"]


def test_token_bytes_against_gpt2_table(smol, smol_md):
    tokens, types = smol_md["tokenizer.ggml.tokens"], smol_md["tokenizer.ggml.token_type"]
    for i, (text, t) in enumerate(zip(tokens, types)):
        if t == 1:
            want = bytes(U2B[c] for c in text)
            assert smol.token_bytes(i) == want == smol.token_bytes(i, special=True), i
        else:
            assert t == 3
            assert smol.token_bytes(i) == b"" and smol.token_bytes(i, special=True) == text.encode(), i


# ---------------------------------------------------------------------------------------------------
# Other pre-tokenizers on a tiny vocabulary
# ---------------------------------------------------------------------------------------------------
def byte_level(s: str) -> str:
    return "".join(B2U[b] for b in s.encode("utf-8"))


TINY_MERGES = [("1", "2"), ("12", "3"), ("123", "4"), ("4", "5"), ("Ġ", "p"), ("a", "y"), ("Ġp", "ay")]
TINY_EXTRA = ["xyz"]  # a token no merge reaches (only llama3's ignore_merges emits it whole)
TINY_SPECIAL = [("<ctl>", 3), ("<ctl>!", 3), ("<ud>", 4), ("<|im_end|>", 1)]


def tiny(pre: str, **kw) -> BPETokenizer:
    tokens = [B2U[b] for b in range(256)]  # id == byte value
    tokens += [a + b for a, b in TINY_MERGES] + TINY_EXTRA + [t for t, _ in TINY_SPECIAL]
    types = np.array([1] * (len(tokens) - len(TINY_SPECIAL)) + [t for _, t in TINY_SPECIAL], dtype=np.int32)
    args = dict(pre=pre, bos_id=tokens.index("<ctl>"), eos_id=tokens.index("<|im_end|>"), unk_id=None,
                pad_id=None, add_bos=False, add_eos=False)
    args.update(kw)
    return BPETokenizer(tokens, [f"{a} {b}" for a, b in TINY_MERGES], types, **args)


def tid(tok: BPETokenizer, text: str) -> int:
    """Id of a token given as plain text (byte-level encoded for normal tokens)."""
    t = text if text.startswith("<") else byte_level(text)
    return tok.tokens.index(t)


TEXT_A = "I'll pay 12345!"
TEXT_B = "x.hello I'LL\n\n  y"
SPLITS = {
    # gpt-2: ' ?\p{N}+' keeps a number whole and takes its leading space
    "gpt-2": {TEXT_A: ["I", "'ll", " pay", " 12345", "!"],
              TEXT_B: ["x", ".", "hello", " I", "'", "LL", "\n\n ", " y"],
              " +x": [" +", "x"], "a+b": ["a", "+", "b"]},
    # smollm: '\p{N}' first, so single digits and the space before them alone
    "smollm": {TEXT_A: ["I", "'ll", " pay", " ", "1", "2", "3", "4", "5", "!"],
               TEXT_B: ["x", ".", "hello", " I", "'", "LL", "\n\n ", " y"],
               " +x": [" +", "x"], "a+b": ["a", "+", "b"]},
    # llama-bpe: groups of up to 3 digits, case-insensitive contractions, one char that is no letter,
    # digit or newline (a space included) glued to the letters right after it, newlines gathered by
    # '\s*[\r\n]+'
    "llama-bpe": {TEXT_A: ["I", "'ll", " pay", " ", "123", "45", "!"],
                  TEXT_B: ["x", ".hello", " I", "'LL", "\n\n", " ", " y"],
                  " +x": [" +", "x"], "a+b": ["a", "+b"]},
    # qwen2: llama-bpe's pattern with single digits
    "qwen2": {TEXT_A: ["I", "'ll", " pay", " ", "1", "2", "3", "4", "5", "!"],
              TEXT_B: ["x", ".hello", " I", "'LL", "\n\n", " ", " y"],
              " +x": [" +", "x"], "a+b": ["a", "+b"]},
    # default: punctuation (and $+<=>^~|) isolated first, then GPT-2, then numbers cut in threes
    "default": {TEXT_A: ["I", "'", "ll", " pay", " ", "123", "45", "!"],
                TEXT_B: ["x", ".", "hello", " I", "'", "LL", "\n\n ", " y"],
                " +x": [" ", "+", "x"], "a+b": ["a", "+", "b"]},
}


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_pre_tokenizer_splits(pre):
    tok = tiny(pre)
    for text, want in SPLITS[pre].items():
        assert tok.pre_tokenize(text) == want, (pre, text)
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("pre,want", [
    ("gpt-2", ["1234", "5"]),  # one word, merged by rank
    ("smollm", ["1", "2", "3", "4", "5"]),
    ("qwen2", ["1", "2", "3", "4", "5"]),
    ("llama-bpe", ["123", "45"]),
    ("default", ["123", "45"]),
])
def test_digit_grouping_tokens(pre, want):
    tok = tiny(pre)
    assert tok.encode("12345") == [tid(tok, w) for w in want]


def test_merges_by_rank():
    tok = tiny("gpt-2")
    assert tok.encode(" pay") == [tid(tok, " pay")]  # Ġ p -> Ġp, a y -> ay, Ġp ay -> Ġpay
    assert tok.encode("pay") == [tid(tok, "p"), tid(tok, "ay")]


def test_llama3_ignore_merges():
    assert tiny("llama-bpe").encode("xyz") == [tid(tiny("llama-bpe"), "xyz")]
    gpt2 = tiny("gpt-2")
    assert gpt2.encode("xyz") == [ord("x"), ord("y"), ord("z")]


def test_special_tokens_partition():
    tok = tiny("smollm")
    ctl, ctl_bang, ud, im_end = (tid(tok, t) for t in ("<ctl>", "<ctl>!", "<ud>", "<|im_end|>"))
    text = "a<ctl>!b<ud>c<|im_end|><ctl>"
    # longest special text first: "<ctl>!" wins over "<ctl>"; <|im_end|> is forced to CONTROL by its text
    assert tok.encode(text) == [ord("a"), ctl_bang, ord("b"), ud, ord("c"), im_end, ctl]
    # parse_special=False: control text is tokenized as text, user-defined tokens are still cut out
    off = tok.encode(text, parse_special=False)
    assert ud in off and not {ctl, ctl_bang, im_end} & set(off)
    assert off == [*b"a<ctl>!b", ud, *b"c<|im_end|><ctl>"]
    assert tok.decode(off) == text


def test_token_bytes_and_decode_special():
    tok = tiny("smollm")
    ctl, ud = tid(tok, "<ctl>"), tid(tok, "<ud>")
    assert tok.token_bytes(ctl) == b"" and tok.token_bytes(ctl, special=True) == b"<ctl>"
    assert tok.token_bytes(ud) == b"<ud>"  # user-defined tokens always render
    assert tok.token_bytes(tid(tok, " pay")) == b" pay"
    assert tok.tokens[10] == "Ċ" and tok.token_bytes(10) == b"\n"  # byte 0x0A, shifted into U+010A
    ids = [ord("a"), ctl, ud]
    assert tok.decode(ids) == "a<ud>" and tok.decode(ids, special=True) == "a<ctl><ud>"
    # bytes of a multi-byte character split over tokens join back before UTF-8 decoding
    assert tok.decode(list("é".encode())) == "é"


def test_add_bos_eos():
    tok = tiny("smollm", add_bos=True, add_eos=True)
    bos, eos = tid(tok, "<ctl>"), tid(tok, "<|im_end|>")
    assert tok.encode("ab") == [bos, ord("a"), ord("b"), eos]
    assert tok.encode("ab", add_special=False) == [ord("a"), ord("b")]
    assert tok.encode("") == [bos, eos]


def test_clean_spaces_like_llama_cpp():
    assert clean_spaces(b"a , b . c ? d !") == b"a, b. c? d!"
    assert clean_spaces(b"rock ' n ' roll") == b"rock'n'roll"
    assert clean_spaces(b"it 's I 'm we 're they 've I 'll don 't") == b"it's I'm we're they've I 'll don 't"
    # gpt-2 and llama-bpe clean spaces when decoding; smollm and qwen2 do not (llama_vocab::impl::load)
    for pre, want in [("gpt-2", "Hello, it's"), ("llama-bpe", "Hello, it's"),
                      ("smollm", "Hello , it 's"), ("qwen2", "Hello , it 's")]:
        tok = tiny(pre)
        assert tok.decode(tok.encode("Hello , it 's")) == want, pre


def test_unknown_pre_is_refused():
    with pytest.raises(UnsupportedModelError, match="no-such-pre"):
        tiny("no-such-pre")


def test_from_metadata_defaults():
    tok = tiny("smollm")
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
          "tokenizer.ggml.tokens": tok.tokens,
          "tokenizer.ggml.merges": [f"{a} {b}" for a, b in TINY_MERGES],
          "tokenizer.ggml.token_type": np.ones(tok.n_vocab, dtype=np.int32),
          "tokenizer.ggml.bos_token_id": 65}
    assert BPETokenizer.from_metadata(md).add_bos is True  # llama3's default without add_bos_token
    assert BPETokenizer.from_metadata({**md, "tokenizer.ggml.add_bos_token": False}).add_bos is False
    assert BPETokenizer.from_metadata({**md, "tokenizer.ggml.pre": "qwen2"}).add_bos is False
    with pytest.raises(UnsupportedModelError, match="llama"):
        BPETokenizer.from_metadata({**md, "tokenizer.ggml.model": "llama"})


# ---------------------------------------------------------------------------------------------------
# Slow twins: Python ports of llama.cpp's hand-written matchers (unicode.cpp
# unicode_regex_split_custom_gpt2 / _llama3), compared with the regex pre-tokenizers on real text.
# ---------------------------------------------------------------------------------------------------
def _flags(text, pos):
    if not 0 <= pos < len(text):
        return ""
    ch = text[pos]
    if ch.isspace():
        return "s"
    cat = unicodedata.category(ch)
    return {"L": "L", "N": "N"}.get(cat[0], "" if cat == "Cn" else "o")


def twin_gpt2(text):
    out, prev, pos, n = [], 0, 0, len(text)

    def add(end):
        nonlocal prev
        length = end - prev
        if length:
            out.append(text[prev:end])
        prev = end
        return length

    while pos < n:
        c = text[pos]
        if c == "'" and pos + 1 < n:
            if text[pos + 1] in "stmd":
                pos += add(pos + 2)
                continue
            if pos + 2 < n and text[pos + 1:pos + 3] in ("re", "ve", "ll"):
                pos += add(pos + 3)
                continue
        f2 = _flags(text, pos + 1) if c == " " else _flags(text, pos)
        if f2 in ("L", "N", "o"):
            pos += c == " "
            while _flags(text, pos) == f2:
                pos += 1
            add(pos)
            continue
        ws = 0
        while _flags(text, pos + ws) == "s":
            ws += 1
        if ws > 1 and pos + ws < n:
            pos += ws - 1
        elif ws:
            pos += ws
        else:
            pos += 1
        add(pos)
    return out


def twin_llama3(text, digits=3):
    out, prev, pos, n = [], 0, 0, len(text)

    def add(end):
        nonlocal prev
        length = end - prev
        if length:
            out.append(text[prev:end])
        prev = end
        return length

    while pos < n:
        c, f = text[pos], _flags(text, pos)
        if c == "'" and pos + 1 < n:
            if text[pos + 1].lower() in "stmd":
                pos += add(pos + 2)
                continue
            if pos + 2 < n and text[pos + 1:pos + 3].lower() in ("re", "ve", "ll"):
                pos += add(pos + 3)
                continue
        if c not in "\r\n" and f != "N" and (f == "L" or _flags(text, pos + 1) == "L"):
            pos += 1
            while _flags(text, pos) == "L":
                pos += 1
            add(pos)
            continue
        if f == "N":
            ini = pos
            while _flags(text, pos) == "N":
                pos += 1
                if pos - ini >= digits:
                    add(pos)
                    ini = pos
            add(pos)
            continue
        f2 = _flags(text, pos + 1) if c == " " else f
        if f2 == "o":
            pos += c == " "
            while _flags(text, pos) == "o":
                pos += 1
            while pos < n and text[pos] in "\r\n":
                pos += 1
            add(pos)
            continue
        ws, last_nl = 0, 0
        while _flags(text, pos + ws) == "s":
            if text[pos + ws] in "\r\n":
                last_nl = pos + ws + 1
            ws += 1
        if last_nl:
            pos = last_nl
        elif ws > 1 and pos + ws < n:
            pos += ws - 1
        elif ws:
            pos += ws
        else:
            pos += 1
        add(pos)
    return out


def twin_smollm(text):
    pieces = [p for p in re.split(r"(\d)", text) if p]  # '\p{N}' isolated; ASCII digits suffice here
    return [w for p in pieces for w in twin_gpt2(p)]


STRESS = ("Hello\r\n\r\n  world's   'RE  x\t\ty  123456789 ... 'll' ¡Olé! 你好,世界 x=1+2;  \n"
          " \u00a0nbsp \u2003em-space  end   \n\n\n   tail  ")


@pytest.mark.parametrize("pre,twin", [
    ("gpt-2", twin_gpt2), ("smollm", twin_smollm), ("llama-bpe", twin_llama3),
    ("qwen2", lambda t: twin_llama3(t, digits=1)),
])
def test_pre_tokenizer_matches_llama_cpp_matcher(pre, twin):
    tok = tiny(pre)
    texts = [STRESS, GPL3.read_text(encoding="utf-8")[:20000]]
    texts += [p["text"] for p in reference("smollm2")["prompts"]]
    for text in texts:
        if pre == "smollm" and any(unicodedata.category(c) == "Nd" and not c.isascii() for c in text):
            continue
        assert tok.pre_tokenize(text) == twin(text), (pre, text[:60])
