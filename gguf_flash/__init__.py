"""gguf-flash: run GGUF language models larger than the RAM you give them."""

from .errors import (GGUFFlashError, GGUFFormatError, UnsupportedModelError, ModelFetchError,
                     ContextOverflowError, RamCapError, FlashFormatError, InvalidArgumentError)

__all__ = ["load", "convert", "GGUFFlashError", "GGUFFormatError", "UnsupportedModelError", "ModelFetchError",
           "ContextOverflowError", "RamCapError", "FlashFormatError", "InvalidArgumentError"]

__version__ = "0.1.0"


def load(name_or_path, n_ctx=None, n_threads=None, max_ram=None, mode=None, selector="auto", cold=False):
    """Open a GGUF (path or known model name) -> gguf_flash.engine.LLM. A flash GGUF runs under
    max_ram (bytes or '220M') in mode 'flash' (default), 'naive' or 'dense'."""
    from .engine import load as _load
    return _load(name_or_path, n_ctx=n_ctx, n_threads=n_threads, max_ram=max_ram, mode=mode,
                 selector=selector, cold=cold)


def convert(src, dst, **options):
    """GGUF (path or known model name) -> flash GGUF at dst. See gguf_flash.flash.convert.convert."""
    from .flash.convert import convert as _convert
    return _convert(src, dst, **options)
