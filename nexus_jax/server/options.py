"""What a server (gRPC or HTTP) accepts: its options and the per-request limits they set. Kept apart from both
transports, so the HTTP front runs where gRPC's extra packages (health, reflection) are not installed."""

from __future__ import annotations

import dataclasses
from typing import Any

from nexus_jax.core.request import MAX_ID_LENGTH
from nexus_jax.core.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0                            # 0: any free port (start() returns it)
    max_in_flight: int = 1024                # open Generate streams beyond this get RESOURCE_EXHAUSTED
    retry_after_ms: int = 1000               # hint sent with RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 * 1024 * 1024
    auth_token: str | None = None            # require metadata `authorization: Bearer <token>`
    tls_cert: str | None = None              # PEM paths; both or neither
    tls_key: str | None = None
    grace_s: float = 10.0                    # shutdown: how long open streams may finish
    model_name: str = "embedded-default"
    max_prompt_tokens: int | None = None     # None: the model's max_model_len (the engine's own check)
    max_tokens_limit: int | None = None      # cap on a request's max_tokens; None: what the context leaves
    max_n: int = 16                          # cap on a request's n (completions)
    max_sessions: int = 10000                # open sessions beyond this get RESOURCE_EXHAUSTED
    # A Generate stream whose client reads nothing for this long (its flow-control window stays full) is ended
    # with DEADLINE_EXCEEDED, its request aborted and its admission slot freed; None: never.
    write_timeout_s: float | None = 30.0
    max_id_length: int = 256                 # longest request, program, thread or session id, in characters

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        for name in ("max_in_flight", "max_message_bytes", "max_n", "max_sessions", "max_prompt_tokens",
                     "max_tokens_limit", "max_id_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_id_length > MAX_ID_LENGTH:
            raise ValueError(f"max_id_length must be at most the engine's limit of {MAX_ID_LENGTH}, "
                             f"got {self.max_id_length}")
        timeout = self.write_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise ValueError(f"write_timeout_s must be positive seconds or None, got {timeout!r}")


def prompt_limit(options: ServerOptions, max_model_len: int) -> tuple[int, str]:
    """(the most tokens a prompt may have, the setting that says so), for Tokenizer.check_text_length."""
    if options.max_prompt_tokens:
        return options.max_prompt_tokens, "max_prompt_tokens"
    return max_model_len, "max_model_len"


def check_limits(options: ServerOptions, prompt: str | dict[str, Any], params: SamplingParams) -> None:
    """Raises ValueError naming the server limit a request goes over."""
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    for what, value, option in (("prompt tokens", None if ids is None else len(ids), "max_prompt_tokens"),
                                ("max_tokens", params.max_tokens, "max_tokens_limit"), ("n", params.n, "max_n")):
        limit = getattr(options, option)
        if limit is not None and value is not None and value > limit:
            raise ValueError(f"{what} {value} exceeds the server's limit of {limit} ({option})")
