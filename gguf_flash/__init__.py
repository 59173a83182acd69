"""gguf-flash: run GGUF language models larger than the RAM you give them."""

from .errors import (GGUFFlashError, GGUFFormatError, UnsupportedModelError, ModelFetchError,
                     ContextOverflowError, RamCapError, FlashFormatError, InvalidArgumentError)

__version__ = "0.1.0"
