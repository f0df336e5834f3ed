"""Shared fixtures: request and scheduler factories (CPU only, no model)."""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kestrel.config import SchedulerConfig
from kestrel.kv.kv_manager import KVCacheManager
from kestrel.outputs import ModelOutput
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler.output import SchedulerOutput
from kestrel.scheduler.scheduler import Scheduler

# Kernel tests need Triton (Linux); elsewhere they are not collected.
collect_ignore = [] if importlib.util.find_spec("triton") else ["kernels"]

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; it must be set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

EOS = 1
_ids = itertools.count()


def make_request(
    prompt_len: int = 8,
    max_tokens: int = 4,
    *,
    prompt: list[int] | None = None,
    priority: int = 0,
    arrival: float | None = None,
    rid: str | None = None,
    **params,
) -> Request:
    if prompt is None:  # distinct per request, so tests opt into prefix sharing explicitly
        base = next(_ids) * 97
        prompt = [2 + (base + i) % 1000 for i in range(prompt_len)]
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid or f"r{next(_ids)}", prompt, sp, [EOS], priority,
                   arrival if arrival is not None else float(next(_ids)))


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 32,
    max_num_seqs: int = 16,
    max_model_len: int = 128,
    chunked: bool = True,
    prefix_caching: bool = True,
    new_token_ratio: float = 0.0,
) -> Scheduler:
    """A scheduler over a small KV cache. No KV is reserved for future tokens by default, so
    tests of preemption and block accounting control exactly when blocks run out."""
    cfg = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
        new_token_ratio=new_token_ratio,
    )
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, prefix_caching))


def fake_model_output(
    sched: Scheduler, out: SchedulerOutput, rng: random.Random | None = None
) -> ModelOutput:
    """What a runner would return: one token for each request whose tokens are all computed
    after this step (never EOS unless rng says so)."""
    result = ModelOutput()
    for rid in out.batch_req_ids():
        req = sched.requests[rid]
        done = req.num_computed_tokens + out.num_scheduled_tokens[rid] == req.num_tokens
        token = (EOS if rng and rng.random() < 0.05 else 3 + len(req.output_token_ids) % 40)
        result.req_ids.append(rid)
        result.sampled_token_ids.append([token] if done else [])
        result.logprobs.append(None)
    return result


def run_step(sched: Scheduler, rng: random.Random | None = None):
    out = sched.schedule()
    produced = sched.update_from_output(out, fake_model_output(sched, out, rng))
    return out, produced


@pytest.fixture
def scheduler_factory():
    return make_scheduler


@pytest.fixture
def request_factory():
    return make_request


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """`tiny_model(arch, shard=False, **overrides)`: a tiny random HF checkpoint folder,
    written once per session (arch: llama, llama3, mistral, qwen2, qwen3)."""
    from kestrel.models.dummy import save_random_model

    cache: dict[tuple, str] = {}

    def make(arch: str, shard: bool = False, **overrides: Any) -> str:
        key = (arch, shard, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}{'-sharded' if shard else ''}")
            cache[key] = save_random_model(folder, arch, shard=shard, **overrides)
        return cache[key]

    return make
