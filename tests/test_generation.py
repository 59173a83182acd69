"""Sampling, stop strings, streaming detokenization, chat templates."""

import numpy as np
import pytest

from gguf_flash.errors import GGUFFormatError, InvalidArgumentError
from gguf_flash.generate import CHATML_TEMPLATE, render_chat
from gguf_flash.sampling import Sampler, SamplingParams
from gguf_flash.tokenizer import StreamDecoder


def test_greedy_and_seeded_sampling():
    logits = np.array([0.0, 3.0, 1.0, 2.9, -1.0], np.float32)
    assert Sampler().sample(logits.copy()) == 1
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = [Sampler(p).sample(logits.copy()) for _ in range(5)]
    s = Sampler(p)
    b = [s.sample(logits.copy()) for _ in range(200)]
    assert a == [a[0]] * 5                                  # same seed, same first draw
    freq = np.bincount(b, minlength=5) / 200
    soft = np.exp(logits - logits.max()); soft /= soft.sum()
    assert np.abs(freq - soft).max() < 0.1                  # draws follow softmax(logits)


def test_top_k_top_p_min_p_cut_candidates():
    logits = np.array([5.0, 4.9, 1.0, 0.5, 0.0], np.float32)
    draws = lambda p: {Sampler(p).sample(logits.copy()) for _ in range(1)} | {  # noqa: E731
        s for s in (Sampler(p).sample(logits.copy()) for _ in range(300))}
    assert draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=1)) <= {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=1)) == {0}
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=1)) <= {0, 1}


def test_repetition_penalty_like_llama_cpp():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    out = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0)).penalize(logits.copy(), [0, 1])
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_bad_sampling_parameters():
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(min_p=2.0), dict(repeat_penalty=0.0), dict(top_k=-1)):
        with pytest.raises(InvalidArgumentError):
            Sampler(SamplingParams(**kw))


class ByteTok:
    """token i = one byte of a UTF-8 text."""
    def __init__(self, data):
        self.data = data

    def token_bytes(self, i, special=False):
        return self.data[i:i + 1]


def test_stream_decoder_waits_for_whole_characters():
    data = "aé日😀z".encode()
    dec = StreamDecoder(ByteTok(data))
    pieces = [dec.push(i) for i in range(len(data))]
    assert "".join(pieces) + dec.flush() == "aé日😀z"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"              # the 2-byte é appears once complete


def test_chat_template_sandboxed():
    msgs = [{"role": "user", "content": "hi"}]
    text = render_chat(CHATML_TEMPLATE, msgs)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(GGUFFormatError, match="chat template"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", msgs)


def test_smollm2_chat_template_and_stop_strings(smollm2_llm, smollm2_ref):
    text = smollm2_llm.chat_prompt([{"role": "user", "content": "What is 2+2?"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    res = smollm2_llm.generate("The capital of France is", n_predict=30, stop=["\n"], ignore_eos=True)
    assert res.stop_reason == "stop" and "\n" not in res.text and res.text.startswith(" Paris")
