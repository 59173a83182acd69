"""`python -m gguf_flash ...` is the `gguf-flash` command."""

import sys

from .cli import main

sys.exit(main())
