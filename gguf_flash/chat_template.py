"""Chat templates: the GGUF's own Jinja2 `tokenizer.chat_template`, rendered in an immutable sandbox
under a time and size budget (templates come from untrusted files).

Jinja2's sandbox stops attribute escapes, not cost: `{% for i in range(100000) %}{% for j in
range(100000) %}{% endfor %}{% endfor %}` runs for hours and `{{ 'x' * 10**10 }}` allocates 10 GB.
Three guards bound a render:
  - a line budget: a trace function on the template's own compiled code (and only there) checks the
    clock at every line the template executes, so any loop, however it is built, stops at the deadline;
  - sizes: `*`, `**`, `%` and `+` are intercepted and refused when their result would exceed the output
    limit, padding methods and filters (`center`, `ljust`, `format` widths ...) too, and the strings and
    lists a template holds in its variables (a `~` doubling in a loop) are measured at every line;
  - the output is streamed and counted: more than `max_bytes` characters stops the render.
Every failure is a ChatTemplateError naming the problem.
"""

from __future__ import annotations

import re
import sys
import time

from .errors import ChatTemplateError

# llama.cpp falls back to ChatML when a model has no template of its own
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                   "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

MAX_SECONDS = 2.0          # a real template renders in milliseconds
MAX_BYTES = 1 << 20        # characters of output (and of any string or list a template builds)
_WIDE = re.compile(r"\d{7,}")   # a format width of >= 1,000,000 characters
_PADDING = {"center", "ljust", "rjust", "zfill", "expandtabs"}


class _Budget:
    def __init__(self, seconds: float, max_bytes: int):
        self.deadline = time.monotonic() + seconds
        self.seconds, self.max_bytes = seconds, max_bytes

    def check_time(self):
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template still running after {self.seconds:g} s: stopped")

    def check_size(self, n: int, what: str):
        if n > self.max_bytes:
            raise ChatTemplateError(f"chat template builds {what} of {n:,} items, more than the limit of "
                                    f"{self.max_bytes:,}")


def _size(v) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple, dict)) else 0


def _make_environment(budget: _Budget):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%", "+"])

        def call_binop(self, context, operator, left, right):
            budget.check_time()
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if _size(seq) and isinstance(k, int):
                        budget.check_size(_size(seq) * max(k, 0), "a repeated sequence")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 64 \
                    and abs(left) > 1:
                budget.check_size(left.bit_length() * right // 8, "a power (bytes)")
            elif operator == "%" and isinstance(left, str) and _WIDE.search(left):
                raise ChatTemplateError("chat template uses a format width of a million characters or more")
            elif operator == "+":
                budget.check_size(_size(left) + _size(right), "a concatenation")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
            budget.check_time()
            name = getattr(__obj, "__name__", "")
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                if name in _PADDING:
                    width = next((a for a in args if isinstance(a, int)), 0)
                    budget.check_size(width * (len(owner) if name == "expandtabs" else 1), "a padded string")
                elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                    grow = owner.count(args[0]) * max(len(args[1]) - len(args[0]), 0) if args[0] else \
                        (len(owner) + 1) * len(args[1])
                    budget.check_size(len(owner) + grow, "a replaced string")
                elif name == "join":
                    budget.check_size(sum(_size(a) for a in (args[0] if args else ())), "a joined string")
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):   # str.format / format_map, at attribute access (jinja >= 3.1.5)
            owner = getattr(value, "__self__", None)
            if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map") \
                    and _WIDE.search(owner):
                raise ChatTemplateError("chat template uses a format width of a million characters or more")
            return super().wrap_str_format(value)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)

    def bounded_filter(name, width_arg):
        original = env.filters[name]

        def f(value, *args, **kwargs):
            width = args[width_arg] if len(args) > width_arg else kwargs.get("width", 0)
            if isinstance(width, int):
                budget.check_size(width * (max(str(value).count("\n"), 0) + 1), f"the {name} filter's output")
            if name == "format" and isinstance(value, str) and _WIDE.search(value):
                raise ChatTemplateError("chat template uses a format width of a million characters or more")
            return original(value, *args, **kwargs)
        env.filters[name] = f

    for name, width_arg in (("center", 0), ("indent", 0), ("wordwrap", 0), ("format", 99)):
        bounded_filter(name, width_arg)

    def raise_exception(msg):
        raise ChatTemplateError(f"chat template raised: {msg}")

    env.globals["raise_exception"] = raise_exception
    return env, Namespace


def _tracer(budget: _Budget, namespace_type):
    """sys.settrace function: traces only frames of compiled template code (filename '<template>'),
    and at each of their lines checks the clock and the sizes of the template's variables."""
    def local(frame, event, arg):
        if event == "line":
            budget.check_time()
            for v in frame.f_locals.values():
                budget.check_size(_size(v), "a variable")
                if isinstance(v, namespace_type):
                    for x in v._Namespace__attrs.values():
                        budget.check_size(_size(x), "a namespace attribute")
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None
    return global_


def render_chat(template: str | None, messages, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, max_seconds: float = MAX_SECONDS,
                max_bytes: int = MAX_BYTES) -> str:
    """Apply a chat template in Jinja2's immutable sandbox, within max_seconds and max_bytes of output."""
    from jinja2.exceptions import TemplateError

    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"chat template is a {type(template).__name__}, not a string")
    budget = _Budget(max_seconds, max_bytes)
    env, namespace_type = _make_environment(budget)
    pieces, n = [], 0
    previous = sys.gettrace()
    try:
        tmpl = env.from_string(template or CHATML_TEMPLATE)
        sys.settrace(_tracer(budget, namespace_type))
        try:
            for piece in tmpl.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                       add_generation_prompt=add_generation_prompt):
                n += len(piece)
                budget.check_size(n, "output")
                pieces.append(piece)
        finally:
            sys.settrace(previous)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (RecursionError, MemoryError, OverflowError, TypeError, ValueError, ArithmeticError,
            LookupError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    return "".join(pieces)
