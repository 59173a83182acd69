"""gguf-flash: run GGUF language models larger than the RAM you give them."""

from .errors import (GGUFFlashError, GGUFFormatError, UnsupportedModelError, ModelFetchError,
                     ContextOverflowError, RamCapError, FlashFormatError, InvalidArgumentError)

__version__ = "0.1.0"


def load(name_or_path, n_ctx=None, n_threads=None):
    """Open a GGUF (path or known model name) -> gguf_flash.engine.LLM."""
    from .engine import load as _load
    return _load(name_or_path, n_ctx=n_ctx, n_threads=n_threads)
