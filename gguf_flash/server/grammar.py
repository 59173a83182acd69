"""Constrained decoding (response_format json_object / json_schema, llama-server's `grammar`) through
llguidance, the grammar library llama.cpp itself links: a Rust Earley parser over the token trie that
computes the allowed-token mask in tens of microseconds, built here from our vocabulary's bytes.

Adapter: llguidance needs every token's bytes (special tokens prefixed with 0xff, as its llama.cpp
binding does, so that grammar text can never produce them), the end-of-generation id, and a tokenize
function for text it forces."""

from __future__ import annotations

import json

import numpy as np

from .schema import APIError


class GrammarTokenizer:
    """Our tokenizer as llguidance's LLTokenizer (built once per server: ~0.1-1 s for 50k tokens)."""

    def __init__(self, tokenizer, n_vocab: int):
        import llguidance

        self.n_vocab = n_vocab
        tokens = []
        special = []
        for i in range(n_vocab):
            plain = tokenizer.token_bytes(i, special=False) if i < tokenizer.n_vocab else b""
            full = tokenizer.token_bytes(i, special=True) if i < tokenizer.n_vocab else b""
            if not plain and full:                 # a control token: hidden from text
                tokens.append(b"\xff" + full)
                special.append(i)
            else:
                tokens.append(plain)
        eog = sorted(tokenizer.eog_ids)
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else (eog[0] if eog else 0)

        class _Wrapped:                            # llguidance.TokenizerWrapper's duck type
            eos_token_id = eos
            bos_token_id = tokenizer.bos_id
            special_token_ids = special

            def __call__(self, s):
                text = s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s
                return tokenizer.encode(text, add_special=False, parse_special=False)

        wrapped = _Wrapped()
        wrapped.tokens = tokens
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapped), n_vocab=n_vocab,
                                         eos_token=eog or eos)
        self.eog = frozenset(eog)

    def matcher(self, response_format: dict) -> "Constraint":
        import llguidance

        try:
            if response_format["type"] == "grammar":
                grammar = llguidance.grammar_from("gbnf", response_format["grammar"])
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    json.dumps(response_format["schema"]),
                    defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        except (ValueError, TypeError) as e:
            raise APIError(400, f"response_format: {e}", param="response_format", code="invalid_grammar") from None
        m = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if m.is_error():
            raise APIError(400, f"response_format: {m.get_error()}", param="response_format",
                           code="invalid_grammar")
        return Constraint(m, self.n_vocab)


class Constraint:
    """One request's grammar state: mask the logits, then consume the sampled token."""

    def __init__(self, matcher, n_vocab: int):
        self.m, self.n_vocab = matcher, n_vocab

    def mask(self, logits: np.ndarray) -> None:
        """Sets the logits (n_vocab,) f32 of tokens the grammar forbids to -inf, in place."""
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)        # (ceil(n/32) * 4,) u8
        allowed = np.unpackbits(bits, bitorder="little")[:self.n_vocab].astype(bool)  # (n_vocab,) bool
        logits[~allowed] = -np.inf

    def consume(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self.m.get_error()}")

    def done(self) -> bool:
        return self.m.is_stopped()
