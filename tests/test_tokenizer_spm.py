"""SPMTokenizer against llama.cpp: reference tokenizations of Gemma 3 (../shared/reference/gemma3.json),
and, on a tiny synthetic vocabulary, the sentencepiece path against a slow twin of llama.cpp's
algorithm (st_partition via str.split + `spm_merge_slow`)."""

import random
import time

import numpy as np
import pytest

from gguf_flash.errors import GGUFFormatError, InvalidArgumentError
from gguf_flash.tokenizer_spm import SPACE_ESCAPE, SPMTokenizer, serialize_model_proto, spm_merge_slow

from conftest import GPL3, reference as load_reference


# ---------------------------------------------------------------------------------------------------
# The slow twin: llama_vocab::impl::tokenize for SPM, written independently of the module's partition
# ---------------------------------------------------------------------------------------------------
def twin_encode(tok: SPMTokenizer, text: str, add_special=True, parse_special=True) -> list[int]:
    types = tok.token_types
    kinds = (1 << 2) | (1 << 3) | (1 << 4) if parse_special else (1 << 4)   # unknown, control, user
    special = [i for i in range(tok.n_vocab) if (1 << int(types[i])) & kinds]
    special.sort(key=lambda i: -len(tok.texts[i].encode()))
    frags = [text] if text else []
    for i in special:
        out = []
        for f in frags:
            if isinstance(f, int):
                out.append(f)
                continue
            for k, part in enumerate(f.split(tok.texts[i])):
                if k:
                    out.append(i)
                if part:
                    out.append(part)
        frags = out
    ids = [tok.bos_id] if add_special and tok.add_bos else []
    prev_special = True
    for f in frags:
        if isinstance(f, int):
            ids.append(f)
            prev_special = True
        else:
            f = (" " + f) if tok.add_space_prefix and prev_special else f
            ids += spm_merge_slow(f.replace(" ", SPACE_ESCAPE), tok.token_to_id, tok.scores)
            prev_special = False
    if add_special and tok.add_eos:
        ids.append(tok.eos_id)
    return ids


# ---------------------------------------------------------------------------------------------------
# A tiny synthetic vocabulary with every token type
# ---------------------------------------------------------------------------------------------------
def tiny_vocab(duplicate=False):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]                         # control, control, control, unknown
    types = [3, 3, 3, 2]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["▁", "a", "b", "c", "<", ">", "x", "t", "n", "▁a", "ab", "bc", "abc", "▁ab", "▁abc", "ca",
              "<c", "<ct", "<ctl", "<0", "<0x", "<0x4", "<0x41", "<u", "<un", "<unk",
              "a▁", "▁▁", "é"]
    tokens += normal
    types += [1] * len(normal)
    tokens += ["  ", "<b>", "<ctl>x", "<ctl>"]                           # user, user, user, control
    types += [4, 4, 4, 3]
    tokens += ["<unused0>"]
    types += [5]
    if duplicate:
        tokens += ["ab"]                                                  # a second "ab": the last wins
        types += [1]
    rng = np.random.default_rng(7)
    scores = np.zeros(len(tokens), np.float32)
    scores[260:] = -rng.permutation(len(tokens) - 260).astype(np.float32)
    scores[:4] = -1000.0
    return tokens, scores, np.array(types, np.int32)


def tiny_tokenizer(add_space_prefix=False, duplicate=False, unk_id=3, add_eos=False):
    tokens, scores, types = tiny_vocab(duplicate)
    return SPMTokenizer(tokens, scores, types, bos_id=2, eos_id=1, unk_id=unk_id, pad_id=0, add_bos=True,
                        add_eos=add_eos, add_space_prefix=add_space_prefix)


def random_texts(seed, n=300):
    rng = random.Random(seed)
    alphabet = ["a", "b", "c", " ", "  ", "<", ">", "x", "t", "\n", "é", "ü", "🚗", "<ctl>", "<b>",
                "<unk>", "<0x41>", "<bos>", "▁", "<unused0>"]
    return [("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))) for _ in range(n)]


@pytest.mark.parametrize("add_space_prefix", [False, True])
@pytest.mark.parametrize("duplicate", [False, True])
def test_tiny_vocab_matches_twin(add_space_prefix, duplicate):
    tok = tiny_tokenizer(add_space_prefix, duplicate)
    assert tok._sp is not None  # the sentencepiece path is what is under test
    for text in random_texts(seed=1 + add_space_prefix + 2 * duplicate):
        for parse_special in (False, True):
            for add_special in (False, True):
                assert tok.encode(text, add_special, parse_special) == \
                    twin_encode(tok, text, add_special, parse_special), (text, parse_special)


def test_python_merge_path_without_unk_matches_sentencepiece_path():
    fast, slow = tiny_tokenizer(), tiny_tokenizer(unk_id=None)
    assert slow._sp is None
    for text in random_texts(seed=11):
        assert slow.encode(text, parse_special=False) == fast.encode(text, parse_special=False)


def test_duplicate_text_resolves_to_last_id():
    tok = tiny_tokenizer(duplicate=True)
    last = tok.n_vocab - 1
    assert tok.texts[last] == "ab" and tok.text_to_token("ab") == last
    assert tok.encode("ab", add_special=False) == [last]


def test_partition_and_space_prefix_follow_llama_cpp():
    tok = tiny_tokenizer(add_space_prefix=True)
    ctl, user_sp, user_b, user_ctlx = (tok.text_to_token(t) for t in ("<ctl>", "  ", "<b>", "<ctl>x"))
    # longest special text first: "<ctl>x" (user-defined) beats "<ctl>" (control)
    assert tok.partition("a<ctl>xb<ctl>", True) == ["a", user_ctlx, "b", ctl]
    # without parse_special only user-defined texts are split out
    assert tok.partition("a<ctl>  <b>", False) == ["a<ctl>", user_sp, user_b]
    # the space prefix goes on every fragment that follows a special token, user-defined ones included
    assert tok.encode("ab  ab", add_special=False, parse_special=False) == \
        [tok.text_to_token("▁ab"), user_sp, tok.text_to_token("▁ab")]
    # literal control text without parse_special is merged like any other text, as llama.cpp does
    assert tok.encode("<ctl>", add_special=False, parse_special=False) == [tok.text_to_token("▁"), ctl]
    # "<0x41>" and "<unk>" are texts sentencepiece cannot merge into: the Python loop handles them
    assert tok.encode("<0x41>", add_special=False, parse_special=False) == \
        [tok.text_to_token("▁"), tok.text_to_token("<0x41>")]
    assert tok.encode("", add_special=True) == [tok.bos_id]
    assert tiny_tokenizer(add_eos=True).encode("a") == [2, tok.text_to_token("a"), 1]


def test_token_bytes_and_decode():
    tok = tiny_tokenizer(add_space_prefix=True)
    tid = tok.text_to_token
    assert tok.token_bytes(tid("▁ab")) == b" ab"
    assert tok.token_bytes(tid("<0x41>")) == b"A"
    assert tok.token_bytes(tid("  ")) == b"  "                       # user-defined: text as is
    assert tok.token_bytes(2) == b"" and tok.token_bytes(2, special=True) == b"<bos>"
    assert tok.token_bytes(3) == b""                                   # unknown
    assert tok.token_bytes(tid("<unused0>"), special=True) == b""    # unused: suppressed like llama.cpp
    # the first token loses one leading space (add_space_prefix), a cut character becomes U+FFFD
    assert tok.decode([tid("▁ab"), tid("▁a")]) == "ab a"
    assert tok.decode([tok.text_to_token("<0xC3>")]) == "\ufffd"
    # without a space prefix decoding is lossless (special=True: literal "<unk>" merges into unk),
    # except that llama.cpp merges a literal "<0x41>" into the byte token, which decodes to "A"
    plain = tiny_tokenizer()
    assert plain.decode(plain.encode("<0x41>", add_special=False)) == "A"
    for text in random_texts(seed=5):
        text = text.replace("<0x41>", "").replace(SPACE_ESCAPE, "")  # a literal U+2581 decodes as ' '
        for parse_special in (False, True):
            assert plain.decode(plain.encode(text, False, parse_special), special=True) == text
    with pytest.raises(InvalidArgumentError):
        tok.token_bytes(tok.n_vocab)


def test_bad_arrays_raise():
    tokens, scores, types = tiny_vocab()
    with pytest.raises(GGUFFormatError):
        SPMTokenizer(tokens, scores[:-1], types, bos_id=2, eos_id=1, unk_id=3, pad_id=0, add_bos=True,
                     add_eos=False, add_space_prefix=False)
    with pytest.raises(GGUFFormatError):
        SPMTokenizer(tokens, scores, types, bos_id=len(tokens), eos_id=1, unk_id=3, pad_id=0,
                     add_bos=True, add_eos=False, add_space_prefix=False)


def test_serialized_proto_round_trips_through_sentencepiece():
    import sentencepiece
    tokens, scores, types = tiny_vocab()
    sp_types = np.where(types == 6, 6, 1).astype(np.uint8)
    sp_types[3] = 2
    long_piece = "é" * 70                                               # 140 bytes: 2-byte varints
    sp = sentencepiece.SentencePieceProcessor(
        model_proto=serialize_model_proto(tokens + [long_piece], np.append(scores, -1.5),
                                          np.append(sp_types, 1), unk_id=3))
    assert sp.get_piece_size() == len(tokens) + 1
    assert [sp.id_to_piece(i) for i in range(len(tokens))] == tokens
    assert sp.id_to_piece(len(tokens)) == long_piece and sp.get_score(len(tokens)) == -1.5
    assert [sp.get_score(i) for i in range(len(tokens))] == scores.tolist()
    assert sp.is_byte(4) and sp.is_unknown(3)


# ---------------------------------------------------------------------------------------------------
# Gemma 3 against llama.cpp's reference outputs
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_vocab(gemma3_path):
    from gguf_flash.gguf_file import GGUFFile
    f = GGUFFile(gemma3_path)
    assert f.get("tokenizer.ggml.model") == "llama"
    g = lambda k: f.get("tokenizer.ggml." + k)  # noqa: E731
    return dict(tokens=g("tokens"), scores=np.asarray(g("scores"), np.float32),
                token_types=np.asarray(g("token_type"), np.int32),
                bos_id=g("bos_token_id"), eos_id=g("eos_token_id"), unk_id=g("unknown_token_id"),
                pad_id=g("padding_token_id"), add_bos=bool(g("add_bos_token")),
                add_eos=bool(g("add_eos_token")), add_space_prefix=bool(g("add_space_prefix")))


@pytest.fixture(scope="module")
def gemma(gemma_vocab):
    v = dict(gemma_vocab)
    cpu, wall = time.process_time(), time.perf_counter()
    tok = SPMTokenizer(v.pop("tokens"), v.pop("scores"), v.pop("token_types"), **v)
    tok.build_seconds = (time.process_time() - cpu, time.perf_counter() - wall)
    return tok


@pytest.fixture(scope="module")
def reference():
    return load_reference("gemma3")


def test_gemma_builds_fast(gemma, reference):
    cpu, wall = gemma.build_seconds
    print(f"SPMTokenizer(Gemma 3, {gemma.n_vocab} tokens): {cpu:.3f} s CPU, {wall:.3f} s wall")
    assert gemma.n_vocab == reference["n_vocab"] == 262144
    assert (gemma.bos_id, gemma.eos_id, gemma.add_bos) == \
        (reference["bos_id"], reference["eos_id"], reference["add_bos_from_metadata"])
    assert gemma._sp is not None
    assert cpu < 1.5  # CPU time, not wall: the machine is shared
    assert gemma.eot_id == gemma.text_to_token("<end_of_turn>") and gemma.eot_id in gemma.eog_ids


def test_gemma_prompts_match_llama_cpp(gemma, reference):
    for p in reference["prompts"]:
        assert gemma.encode(p["text"]) == p["tokens_add_special"], p["id"]
        assert gemma.encode(p["text"], add_special=False) == p["tokens_no_bos"], p["id"]
        assert gemma.decode(p["tokens_no_bos"], special=True) == p["text"], p["id"]
        if "<start_of_turn>" not in p["text"]:
            assert gemma.decode(p["tokens_add_special"]) == p["text"], p["id"]


def test_gemma_gpl3_token_count_and_twin(gemma, reference):
    text = GPL3.read_text()
    ids = gemma.encode(text, add_special=False, parse_special=False)
    assert len(ids) == reference["perplexity_gpl3"]["n_text_tokens"] == 7562
    assert gemma.decode(ids) == text
    assert ids == twin_encode_fast_partition(gemma, text)


def twin_encode_fast_partition(tok, text):
    """The twin's merge loop on the module's partition (the twin's own partition walks all 262k ids)."""
    out = []
    for f in tok.partition(text, False):
        out += [f] if isinstance(f, int) else spm_merge_slow(f.replace(" ", SPACE_ESCAPE),
                                                             tok.token_to_id, tok.scores)
    return out


def test_gemma_special_looking_text(gemma):
    text = ("x<eos>y <start_of_turn>user\n<end_of_turn> <0x0A> <unk> <mask> <unused12> [multimodal] "
            "<table><td>  \t\t\n\n<b>bold</b>")
    with_special = gemma.encode(text, add_special=False)
    assert gemma.decode(with_special, special=True) == text
    assert gemma.text_to_token("<start_of_turn>") in with_special
    plain = gemma.encode(text, add_special=False, parse_special=False)
    assert plain == twin_encode_fast_partition(gemma, text)
    assert gemma.text_to_token("<start_of_turn>") not in plain
    assert gemma.text_to_token("<table>") in plain        # user-defined: split out even so
    assert gemma.decode(plain) == text
