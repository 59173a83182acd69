"""gguf-flash: run GGUF language models larger than the RAM you give them."""

from .errors import (GGUFFlashError, GGUFFormatError, UnsupportedModelError, ModelFetchError,
                     ContextOverflowError, RamCapError, FlashFormatError, InvalidArgumentError, ChatTemplateError,
                     OutputError)

__all__ = ["load", "convert", "GGUFFlashError", "GGUFFormatError", "UnsupportedModelError", "ModelFetchError",
           "ContextOverflowError", "RamCapError", "FlashFormatError", "InvalidArgumentError", "ChatTemplateError",
           "OutputError"]

__version__ = "0.1.0"


def load(name_or_path, n_ctx=None, n_threads=None, max_ram=None, mode=None, selector="auto", cold=False,
         n_ctx_for=None, kv_type="f16", on_tokenizer=None, logit_rows=0, head="auto", progress=False):
    """Open a GGUF (path or known model name) -> gguf_flash.engine.LLM. A flash GGUF runs under
    max_ram (bytes or '220M') in mode 'flash' (default), 'naive' or 'dense'. kv_type: 'f16' (default,
    llama.cpp's) or 'f32' KV cache. on_tokenizer(tokenizer, file) runs before the model loads (see
    engine.LLM). logit_rows: prompt positions whose logits a flash model computes together when every
    position's are asked for (perplexity; its buffer is in the RAM plan). head: 'auto' (a flash file's
    head index may serve decoding: calibrated, not proven; see docs/flash-gguf.md) or 'exact'. A first
    run compiles the model's kernels once, in a child process: logged at INFO (logger
    gguf_flash.firstrun), or one progress line on stderr with progress=True."""
    import gc
    # Importing the engine and opening a model build ~1M Python objects (numba's typing registries, the
    # vocabulary) and no garbage cycles; the cyclic GC walking them was ~0.15 s of Gemma's 1.4 s to the
    # first token, so it waits until the model is open.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        from .engine import load as _load
        return _load(name_or_path, n_ctx=n_ctx, n_threads=n_threads, max_ram=max_ram, mode=mode,
                     selector=selector, cold=cold, n_ctx_for=n_ctx_for, kv_type=kv_type,
                     on_tokenizer=on_tokenizer, logit_rows=logit_rows, head=head, progress=progress)
    finally:
        if was_enabled:
            gc.enable()


def convert(src, dst, **options):
    """GGUF (path or known model name) -> flash GGUF at dst. See gguf_flash.flash.convert.convert."""
    from .flash.convert import convert as _convert
    return _convert(src, dst, **options)
