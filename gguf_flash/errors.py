"""Typed errors. Library code raises these; only the CLI turns them into one line and exit code 2."""


class GGUFFlashError(Exception):
    """Base class of every error gguf_flash raises on purpose.

    An error that ends a generation midway carries what it produced: `tokens` (ids) and `text` (what
    was streamed), filled in by generate.generate and LLM.stream; empty when nothing was generated."""

    tokens: tuple | list = ()   # an error that carries tokens gets its own list
    text: str = ""


class GGUFFormatError(GGUFFlashError):
    """The file is not a GGUF, is truncated, or is inconsistent."""


class UnsupportedModelError(GGUFFlashError):
    """An architecture, tensor type or tokenizer this engine does not implement."""


class ModelFetchError(GGUFFlashError):
    """A real model could not be downloaded or verified."""


class ContextOverflowError(GGUFFlashError):
    """More tokens than the context (-c) holds."""


class RamCapError(GGUFFlashError):
    """The RAM cap cannot be met (refused before loading) or was exceeded while running."""

    def __init__(self, message, tokens=None, need: int | None = None):
        super().__init__(message)
        self.need = need   # bytes: the least cap that would be accepted (a refused plan)
        self.tokens = list(tokens or [])  # what was generated before the cap was hit
        self.text = ""


class FlashFormatError(GGUFFormatError):
    """A flash-GGUF file whose flash.* keys or bundle tensors are missing or inconsistent, or whose
    bundles could not be read while running (truncated, replaced, an I/O error)."""


class ChatTemplateError(GGUFFormatError):
    """A model's chat template failed, escaped its sandbox, or exceeded its time or size budget."""


class OutputError(GGUFFlashError):
    """An output file could not be written (disk full, no permission, ...); nothing was left at its path."""


class InvalidArgumentError(GGUFFlashError):
    """A bad option value (sampling parameter, size string, ...)."""
