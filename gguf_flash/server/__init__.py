"""`gguf-flash serve`: an OpenAI-compatible HTTP server (needs the `serve` extra: starlette, uvicorn,
llguidance). app.py = HTTP, worker.py = queue + generation + KV prefix reuse, schema.py = request
validation, responses.py = OpenAI's response shapes, grammar.py = constrained decoding."""
