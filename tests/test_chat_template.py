"""Hostile chat templates (issue 16): Jinja2's sandbox stops attribute escapes, the budget in
gguf_flash/chat_template.py stops cost. Each template ends in a ChatTemplateError (a GGUFFormatError)
within the time budget (2 s) plus slack, without building more than the size budget (1 MiB)."""

import time

import pytest
from gguf import GGUFValueType

import gguf_flash
from gguf_flash.chat_template import CHATML_TEMPLATE, MAX_SECONDS, render_chat
from gguf_flash.errors import ChatTemplateError, GGUFFormatError

from fuzz_gguf import rewrite

MSGS = [{"role": "user", "content": "hi"}]

HOSTILE = {
    # never ends: two nested loops of the sandbox's largest range (10^10 iterations)
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested-range-output": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "nested-string-loops": "{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    # gigabytes
    "repeat": "{{ 'x' * 10000000000 }}",
    "repeat-reversed": "{{ 10000000000 * 'x' }}",
    "list-repeat": "{{ ([1] * 1000000000)|length }}",
    "power": "{{ 10 ** 100000000 }}",
    "doubling-tilde": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s|length }}",
    "doubling-plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}",
    "output-stream": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "center-filter": "{{ 'x'|center(2000000000) }}",
    "indent-filter": "{{ 'a\nb'|indent(1000000000) }}",
    "ljust-method": "{{ 'x'.ljust(2000000000) }}",
    "format-filter": "{{ '%2000000000s'|format('x') }}",
    "format-method": "{{ '{:>2000000000}'.format('x') }}",
    "percent": "{{ '%2000000000s' % 'x' }}",
    "replace": "{% set s = 'a' * 1000 %}{{ s.replace('a', 'b' * 100000) }}",
    "join": "{% set s = ['x' * 100000] * 100 %}{{ ''.join(s) }}",
    # escapes and template errors
    "escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "raise": "{{ raise_exception('no system role') }}",
    "syntax": "{% for %}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_stopped(name):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="chat template"):
        render_chat(HOSTILE[name], MSGS)
    assert time.perf_counter() - t0 < MAX_SECONDS + 1.5


def test_ordinary_templates_render():
    assert render_chat(CHATML_TEMPLATE, MSGS) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # loops, namespaces, string building within the budget are fine
    t = ("{% set ns = namespace(n=0) %}{% for m in messages * 50 %}{% set ns.n = ns.n + 1 %}"
         "{{ m['content']|upper ~ '|' }}{% endfor %}{{ ns.n }}")
    assert render_chat(t, MSGS) == "HI|" * 50 + "50"


def test_budget_is_a_parameter():
    with pytest.raises(ChatTemplateError, match="output"):
        render_chat("{{ 'x' * 100 }}{{ 'x' * 100 }}", MSGS, max_bytes=150)
    with pytest.raises(ChatTemplateError, match="0.2 s"):
        render_chat(HOSTILE["nested-range"], MSGS, max_seconds=0.2)


def test_trace_function_is_restored():
    import sys
    seen = []

    def outer(frame, event, arg):
        seen.append(event)
        return None
    sys.settrace(outer)
    try:
        with pytest.raises(ChatTemplateError):
            render_chat(HOSTILE["nested-range"], MSGS, max_seconds=0.1)
        assert sys.gettrace() is outer
    finally:
        sys.settrace(None)


@pytest.mark.parametrize("name", ["nested-range", "repeat", "doubling-tilde"])
def test_model_with_hostile_template(tiny_llama_path, tmp_path, name):
    """`gguf-flash chat` renders the file's template through LLM.chat_prompt: a hostile one is a
    GGUFFormatError naming the problem, within the budget."""
    path = rewrite(tiny_llama_path, tmp_path / "hostile.gguf",
                   meta={"tokenizer.chat_template": (HOSTILE[name], GGUFValueType.STRING, None)})
    llm = gguf_flash.load(path)
    t0 = time.perf_counter()
    with pytest.raises(GGUFFormatError, match="chat template"):
        llm.chat_prompt(MSGS)
    with pytest.raises(GGUFFormatError, match="chat template"):
        llm.chat(MSGS, n_predict=2)
    assert time.perf_counter() - t0 < 2 * MAX_SECONDS + 3
