"""`ServerConfig`: the HTTP server's options (the engine's live in kestrel.config).

Kept free of server dependencies so the CLI can derive `kestrel serve` flags from these fields
without importing FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # TCP port to listen on
    api_key: str | None = None  # require "Authorization: Bearer KEY" on every route but /health
    served_model_name: list[str] | None = None  # names clients pass as "model" (default: path)
    max_queued_requests: int | None = None  # answer 503 while this many wait (None: no limit)
    max_request_body_bytes: int = 8 << 20  # answer 413 for larger request bodies
    allow_special_tokens_in_messages: bool = False  # parse special-token text in chat messages
    log_level: str = "info"  # uvicorn log level (debug, info, warning, error)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.max_request_body_bytes < 1:
            raise ValueError(
                f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")
