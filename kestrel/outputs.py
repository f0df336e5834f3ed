"""Result records: `RequestOutput` / `CompletionOutput` for users and `ModelOutput` from the
runner to the scheduler.

Owns only plain data. `ModelOutput` is, with `SchedulerOutput`, the whole contract between
scheduler and runner: no tensors cross it, only host lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token under the model's raw (unprocessed) distribution."""

    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen/actual token plus the top-N).
SampleLogprobs = list[dict[int, Logprob]]
# Position 0 (the first prompt token) has no logprob and is None.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class TokenLogprobs:
    """Logprobs of one position as computed by the runner (no text yet).

    token_ids[0] is the chosen (or actual prompt) token; token_ids[1:] are the top-N by logprob.
    """

    token_ids: list[int]
    logprobs: list[float]
    rank: int  # rank of token_ids[0] in the full distribution (1 = argmax)


@dataclass
class ModelOutput:
    """What the runner returns for one `SchedulerOutput`."""

    # Every request scheduled in the step, in batch order.
    req_ids: list[str] = field(default_factory=list)
    # Per request: new token ids; [] when the step only computed part of its prompt.
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    # Per request: one TokenLogprobs per sampled token when params.logprobs is set, else None.
    logprobs: list[list[TokenLogprobs] | None] = field(default_factory=list)
    # req_id -> logprobs of the prompt tokens computed this step (positions 1.. of the chunk),
    # only for requests whose params.prompt_logprobs is set.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # Text added since the previous RequestOutput of this request; while running it holds
    # back what could still become a stop string (what a stream should send).
    delta_text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
