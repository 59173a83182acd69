"""The Python API: `gguf_flash.load(name_or_path)` -> LLM (tokenize, detokenize, generate, logits, chat)."""

from __future__ import annotations

import numpy as np

from . import firstrun, models
from .errors import GGUFFlashError, GGUFFormatError, InvalidArgumentError, UnsupportedModelError
from .generate import GenerationResult, carry_partial, generate, render_chat, stream_text
from .config import config_from_gguf
from .gguf_file import GGUFFile
from .model import Model
from .sampling import GREEDY, SamplingParams
from .tokenizer import tokenizer_from_gguf


class LLM:
    """A model ready to generate. A flash GGUF runs in `mode` flash (default), naive or dense under
    `max_ram` (bytes or '220M'); a plain GGUF runs dense. n_ctx_for(tokenizer) -> context size: called
    under a cap when n_ctx is not given (the CLI passes prompt + n_predict, so the plan budgets the KV
    cache this run needs, not the model's default context). on_tokenizer(tokenizer, file), if given,
    runs before the model loads: memory it keeps is in a flash plan's measured baseline (the server's
    grammar). logit_rows: prompt positions a flash model runs its head on together when every
    position's logits are asked for (perplexity: a streamed head is read once per that many tokens;
    its (logit_rows, n_vocab) buffer is in the plan). A first run compiles the model's kernels in a
    child process (firstrun.py): progress=True shows a line on stderr, else it is logged (INFO)."""

    def __init__(self, path, n_ctx: int | None = None, n_threads: int | None = None, max_ram=None,
                 mode: str | None = None, selector: str = "auto", cold: bool = False, n_ctx_for=None,
                 kv_type: str = "f16", on_tokenizer=None, logit_rows: int = 0, head: str = "auto",
                 progress: bool = False):
        from .flash.format import is_flash
        self.path = models.resolve(path, progress)
        self.file = GGUFFile(self.path)
        config_from_gguf(self.file)          # an unsupported architecture is refused first
        flash = is_flash(self.file)
        if flash:
            # a first run compiles the kernels in a child process (firstrun.py), with progress
            from .flash.runtime import compile_out_of_process, preload_kernels
            compile_out_of_process(self.file, kv_type, logit_rows, progress)
        if flash and max_ram is not None:
            # kernels first, while the process is small: LLVM's ~70 MiB peak (released after loading)
            # then sits under the cap with room to spare (flash/runtime.preload_kernels)
            preload_kernels(self.file, kv_type=kv_type, logit_rows=logit_rows, held=False)
        self.tokenizer = tokenizer_from_gguf(self.file)  # before the model: a flash plan measures RSS
        if n_ctx is None and n_ctx_for is not None and max_ram is not None:
            n_ctx = n_ctx_for(self.tokenizer)   # under a cap the KV cache is budgeted for this run only
        if on_tokenizer is not None:
            on_tokenizer(self.tokenizer, self.file)
        if flash:
            from .flash.runtime import FlashModel
            self.model = FlashModel(self.file, max_ram=max_ram, mode=mode or "flash", selector=selector,
                                    n_ctx=n_ctx, n_threads=n_threads, cold=cold, kv_type=kv_type,
                                    logit_rows=logit_rows, head=head)
        elif max_ram is not None or mode in ("flash", "naive"):
            raise InvalidArgumentError(
                f"{self.path}: not a flash GGUF, so it cannot run under --max-ram or in {mode or 'flash'} "
                f"mode; convert it first: gguf-flash convert {self.path} OUT.flash.gguf")
        else:
            self.model = Model(self.file, n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type)
            firstrun.ensure_compiled(self.path, "dense", self.model.w.ts, kv_type, 0, progress)
        self.cfg = self.model.cfg

    # ---- text <-> tokens ----
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list:
        try:
            ids = self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)
        except UnsupportedModelError as e:   # e.g. a vocabulary without the byte token a text needs
            raise UnsupportedModelError(f"{self.path}: {e}") from None
        if text and not ids:   # a BPE vocabulary lacking every byte token drops the text silently
            raise GGUFFormatError(f"{self.path}: the vocabulary encodes none of the text ({len(text)} "
                                  f"characters): its tokens cannot spell it")
        return ids

    def detokenize(self, ids, special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), special=special)

    # ---- model ----
    def logits(self, tokens, all_positions: bool = False) -> np.ndarray:
        """Logits of a fresh context fed `tokens`: (n_vocab,) for the last one, or (n, n_vocab)."""
        tokens = list(tokens)
        if not all_positions:
            return self.model.prefill(tokens, 0).copy()
        out = np.zeros((len(tokens), self.cfg.n_vocab), np.float32)
        for start, chunk in self.model.prefill(tokens, 0, logits_rows="all"):
            out[start:start + len(chunk)] = chunk
        return out

    def generate(self, prompt: str | list, n_predict: int = 128, params: SamplingParams = GREEDY,
                 stop=(), stream=None, ignore_eos: bool = False) -> GenerationResult:
        """Generate from a prompt (text, tokenized with the model's BOS rule, or token ids).
        stream: a callable receiving text pieces as they become printable."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if n_predict < 0:
            raise InvalidArgumentError(f"n_predict must be >= 0, got {n_predict}")
        return generate(self.model, self.tokenizer, ids, n_predict, params, stop, stream, ignore_eos)

    def stream(self, prompt, n_predict: int = 128, params: SamplingParams = GREEDY, stop=()):
        """Generator of text pieces, produced as generation goes (nothing is buffered). A GGUFFlashError
        raised midway carries the tokens and text generated before it."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        res = GenerationResult()
        try:
            yield from stream_text(self.model, self.tokenizer, ids, n_predict, params, stop, result=res)
        except GGUFFlashError as e:
            carry_partial(e, res)
            raise

    @property
    def fault(self) -> str | None:
        """Why this model can no longer run (its flash file failed or changed under it), else None."""
        return getattr(getattr(self.model, "store", None), "fault", None)

    def chat_prompt(self, messages, add_generation_prompt: bool = True) -> str:
        tok = self.tokenizer
        bos = tok.decode([tok.bos_id], special=True) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id], special=True) if tok.eos_id is not None else ""
        return render_chat(self.file.get("tokenizer.chat_template"), messages, bos, eos, add_generation_prompt)

    def chat_ids(self, messages) -> list:
        """Token ids of the chat template applied to messages, ready to generate the reply."""
        ids = self.tokenize(self.chat_prompt(messages), add_special=True, parse_special=True)
        # a template that writes BOS itself must not get a second one (llama.cpp warns and drops it)
        if len(ids) > 1 and ids[0] == ids[1] == self.tokenizer.bos_id:
            ids = ids[1:]
        return ids

    def chat(self, messages, n_predict: int = 256, params: SamplingParams = GREEDY, stream=None, stop=()):
        return self.generate(self.chat_ids(messages), n_predict, params, stop=stop, stream=stream)


def load(name_or_path, n_ctx: int | None = None, n_threads: int | None = None, max_ram=None,
         mode: str | None = None, selector: str = "auto", cold: bool = False, n_ctx_for=None,
         kv_type: str = "f16", on_tokenizer=None, logit_rows: int = 0, head: str = "auto",
         progress: bool = False) -> LLM:
    return LLM(name_or_path, n_ctx=n_ctx, n_threads=n_threads, max_ram=max_ram, mode=mode,
               selector=selector, cold=cold, n_ctx_for=n_ctx_for, kv_type=kv_type, on_tokenizer=on_tokenizer,
               logit_rows=logit_rows, head=head, progress=progress)
