"""The OpenAI-compatible HTTP server (needs the `server` extra: pip install kestrel[server]).

Import `kestrel.entrypoints.openai.api_server` for `build_server`, `run_server` and
`ServerThread`; this package itself imports nothing heavy.
"""
