"""ModelRunner: loads the model, owns the KV-cache tensors and executes one step.

Owns: device, dtype, model weights, attention backend, KV tensors, the persistent input batch
and sampling. Receives only `SchedulerOutput`, returns only `ModelOutput`. Must not make
scheduling decisions or detokenize.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kestrel.config import CacheConfig, ModelConfig, SchedulerConfig
from kestrel.kv import memory
from kestrel.models.loader import kv_cache_shape_info, load_hf_config, load_model
from kestrel.outputs import ModelOutput, TokenLogprobs
from kestrel.runner.cuda_graphs import CUDAGraphRunner, batch_buckets
from kestrel.runner.forward_context import ForwardContext, set_forward_context
from kestrel.runner.input_batch import CachedRequestState, InputBatch, StepInputs
from kestrel.runner.sampler import (
    Sampler,
    SamplingBatch,
    compute_prompt_logprobs,
)
from kestrel.runner.staging import StepArena
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler.output import SchedulerOutput
from kestrel.utils.math import cdiv

logger = logging.getLogger("kestrel")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(
        self, model: ModelConfig, cache: CacheConfig, scheduler: SchedulerConfig
    ) -> None:
        self.model_config = model
        self.cache_config = cache
        self.scheduler_config = scheduler
        self.device = torch.device(model.device)
        self.dtype = TORCH_DTYPES[model.dtype]
        torch.manual_seed(model.global_seed)  # the generator of requests without their own seed
        t0 = time.perf_counter()
        self.hf_config = load_hf_config(model.model)
        self.model = load_model(model.model, self.hf_config, self.dtype, self.device)
        self.vocab_size = int(self.hf_config.vocab_size)
        self.num_layers, self.num_kv_heads, self.head_dim = kv_cache_shape_info(self.hf_config)
        self.backend = _select_backend(model.attention_backend, self.device)
        max_blocks = cdiv(scheduler.max_model_len, cache.block_size)
        # A step's inputs and sampling rows fit one arena slot (~24 bytes per token, a
        # block-table row and ~48 bytes of sampling data per request).
        self.arena = StepArena(self.device, max(1 << 20, 24 * scheduler.max_num_batched_tokens
                                                + (4 * max_blocks + 64) * scheduler.max_num_seqs
                                                + (64 << 10)))
        self.batch = InputBatch(
            cache.block_size, self.device, scheduler.max_num_batched_tokens,
            scheduler.max_num_seqs, max_blocks, to_device_many=self.arena.to_device_many,
        )
        self.sampler = Sampler(fused=self.device.type == "cuda",
                               to_device_many=self.arena.to_device_many)
        # Noise keys of rows without a seed: reproducible for a given global_seed.
        self._noise_rng = np.random.default_rng(model.global_seed)
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: CUDAGraphRunner | None = None
        self._buckets = batch_buckets(scheduler.max_num_seqs)  # graph batch sizes
        self._last_handle: StepHandle | None = None
        self._d2h = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.timings = {"load_weights_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ KV cache
    def determine_num_blocks(self) -> int:
        cache, sched = self.cache_config, self.scheduler_config
        bs = cache.block_size
        per_seq = cdiv(sched.max_model_len, bs)
        block_bytes = memory.bytes_per_block(
            self.num_layers, self.num_kv_heads, self.head_dim, bs, self.dtype
        )
        if cache.num_blocks is not None:
            num_blocks = cache.num_blocks
        else:
            if cache.kv_cache_memory is not None:
                budget = cache.kv_cache_memory
            elif self.device.type == "cuda":
                t0 = time.perf_counter()
                budget = self._profile_gpu_budget()
                self.timings["profile_s"] = time.perf_counter() - t0
            else:
                budget = memory.CPU_DEFAULT_KV_BYTES
            useful = sched.max_num_seqs * per_seq + 1
            num_blocks = memory.num_blocks_for(budget, block_bytes, useful)
        if num_blocks < per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {bs} tokens "
                f"({num_blocks * bs} tokens) but max_model_len={sched.max_model_len} needs "
                f"{per_seq}; lower max_model_len or raise kv_cache_memory / "
                f"gpu_memory_utilization / num_blocks"
            )
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB)",
            num_blocks, bs, num_blocks * block_bytes / 2**20,
        )
        return num_blocks

    def _profile_gpu_budget(self) -> int:
        """Run one forward at the largest step shape to measure peak activation memory."""
        sched, bs = self.scheduler_config, self.cache_config.block_size
        num_tokens = min(sched.max_num_batched_tokens, sched.max_model_len * sched.max_num_seqs)
        caches = memory.allocate_kv_caches(
            self.num_layers, cdiv(num_tokens, bs) + 1, bs, self.num_kv_heads, self.head_dim,
            self.dtype, self.device,
        )
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        hidden = self._dummy_forward([num_tokens], caches)
        self.model.compute_logits(hidden[: sched.max_num_seqs])
        torch.cuda.synchronize(self.device)
        del caches, hidden
        budget = memory.gpu_kv_budget(self.device, self.cache_config.gpu_memory_utilization)
        torch.cuda.empty_cache()
        return max(budget, 0)

    @torch.inference_mode()
    def _dummy_forward(self, query_lens: list[int], caches: list[torch.Tensor]) -> torch.Tensor:
        """One eager forward of fresh requests with these query lengths (blocks from 0 up)."""
        bs = self.cache_config.block_size
        batch = InputBatch(bs, self.device)
        out = SchedulerOutput()
        next_block = 0
        for i, n in enumerate(query_lens):
            rid = f"dummy{i}"
            num_blocks = cdiv(n, bs)
            batch.states[rid] = CachedRequestState(
                req_id=rid, prompt_token_ids=[0] * n, output_token_ids=[],
                sampling_params=None, stop_token_ids=[],  # type: ignore[arg-type]
                block_ids=list(range(next_block, next_block + num_blocks)),
                num_computed_tokens=0,
            )
            next_block += num_blocks
            out.scheduled_cached_reqs.req_ids.append(rid)
            out.num_scheduled_tokens[rid] = n
        out.total_num_scheduled_tokens = sum(query_lens)
        inputs = batch.prepare(out)
        with set_forward_context(ForwardContext(inputs.attn_metadata, caches, self.backend)):
            return self.model(inputs.input_ids, inputs.positions)

    @torch.inference_mode()
    def _warmup_kernels(self) -> None:
        """Compile the eager kernel variants mixed steps use (each prefill tile config next
        to decode rows), so the first real requests do not wait for the JIT."""
        num_blocks = self.kv_caches[0].shape[1]
        limit = min(self.scheduler_config.max_num_batched_tokens - 2,
                    self.scheduler_config.max_model_len - 1,
                    (num_blocks - 2) * self.cache_config.block_size)  # dummy blocks must exist
        hidden = None
        for n in sorted({min(32, limit), min(300, limit), min(600, limit)}):
            if n >= 2:
                # NOTE: with and without leading decode rows: the prefill metadata then
                # starts off or on a 16-byte boundary, which Triton compiles separately.
                hidden = self._dummy_forward([1, 1, n], self.kv_caches)
                self._dummy_forward([n], self.kv_caches)
        if hidden is not None:  # the LM head at one row (GEMV) and the fused sampler
            logits = self.model.compute_logits(hidden[:1])
            batch = SamplingBatch(params=[SamplingParams(temperature=0.5)],
                                  prompt_token_ids=[[0]], output_token_ids=[[]],
                                  stop_token_ids=[[]], noise_seeds=[0])
            self.sampler(logits, batch)
        torch.cuda.synchronize(self.device)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        t0 = time.perf_counter()
        self.kv_caches = memory.allocate_kv_caches(
            self.num_layers, num_blocks, self.cache_config.block_size, self.num_kv_heads,
            self.head_dim, self.dtype, self.device,
        )
        self.timings["kv_alloc_s"] = time.perf_counter() - t0
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            self._warmup_kernels()
            self.timings["warmup_s"] = time.perf_counter() - t0
        if self.device.type == "cuda" and not self.model_config.enforce_eager:
            t0 = time.perf_counter()
            sched = self.scheduler_config
            self.graphs = CUDAGraphRunner(
                self.model, self.backend, self.kv_caches, sched.max_num_seqs,
                sched.max_model_len, self.cache_config.block_size, self.device,
            )
            self.graphs.capture()
            self.timings["graph_capture_s"] = time.perf_counter() - t0
        logger.info("startup: %s", ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))

    # ------------------------------------------------------------------ step
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        """The synchronous path: launch a step and wait for its tokens."""
        return self.finish(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> StepHandle:
        """Enqueue one step on the device; returns before its sampled ids reach the host.

        Input tokens sampled by the previous, possibly unfinished, step are placeholders on
        the host and are gathered from that step's device tensor instead.
        """
        self.batch.update(out)
        if out.total_num_scheduled_tokens == 0:
            return StepHandle(req_ids=[], sample_req_ids=[])
        self.arena.begin_step()
        inputs = self.batch.prepare(out)
        meta = inputs.attn_metadata
        if meta.num_tokens == meta.num_reqs:  # decode only: split KV as its graph bucket does
            meta.split_batch_size = next((b for b in self._buckets if b >= meta.num_reqs), 0)
        use_graph = self.graphs is not None and self.graphs.can_run(meta)
        new_ids = self._fill_placeholders(inputs, use_graph) if inputs.placeholder_rows else None
        if use_graph:
            assert self.graphs is not None
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, meta, new_ids)
        else:
            with set_forward_context(ForwardContext(meta, self.kv_caches, self.backend)):
                hidden = self.model(inputs.input_ids, inputs.positions)  # [num_tokens, hidden]
        handle = StepHandle(req_ids=inputs.req_ids, sample_req_ids=inputs.sample_req_ids)
        if inputs.sample_rows:
            self._sample(hidden, inputs, handle)
        handle.prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        self._last_handle = handle
        return handle

    def finish(self, handle: StepHandle) -> ModelOutput:
        """Wait for a launched step's sampled ids; idempotent."""
        if handle.result is not None:
            return handle.result
        tokens: list[int] = []
        if handle.sampled_host is not None:
            if handle.copied is not None:
                handle.copied.synchronize()
            tokens = handle.sampled_host.tolist()
        for rid, tok in zip(handle.sample_req_ids, tokens):
            state = self.batch.states.get(rid)
            if state is not None:
                state.resolve_placeholder(tok)
        sampled = dict(zip(handle.sample_req_ids, tokens))
        result = ModelOutput(req_ids=handle.req_ids, prompt_logprobs=handle.prompt_logprobs)
        for rid in handle.req_ids:
            tok = sampled.get(rid)
            result.sampled_token_ids.append([tok] if tok is not None else [])
            lp = handle.logprobs.get(rid)
            result.logprobs.append([lp] if lp is not None else None)
        handle.result = result
        return result

    def _fill_placeholders(
        self, inputs: StepInputs, defer_slice: bool
    ) -> tuple[torch.Tensor, int, int, int] | None:
        """Put the previous step's sampled ids into this step's placeholder rows. With
        `defer_slice`, a slice is not copied but returned as (tokens, row0, src0, count) for
        the CUDA graph's input kernel to read directly."""
        prev = self._last_handle
        assert prev is not None and prev.sampled_device is not None, "placeholder without a step"
        where = {rid: i for i, rid in enumerate(prev.sample_req_ids)}
        src = [where[rid] for rid in inputs.placeholder_req_ids]
        rows = inputs.placeholder_rows
        n = len(rows)
        if rows == list(range(rows[0], rows[0] + n)) and src == list(range(src[0], src[0] + n)):
            # The common decode step (same requests, same order): no index upload and no
            # gather/scatter kernels; one slice copy, or none under a graph.
            if defer_slice:
                return prev.sampled_device, rows[0], src[0], n
            inputs.input_ids[rows[0] : rows[0] + n] = prev.sampled_device[src[0] : src[0] + n]
            return None
        rows_t, src_t = self.arena.to_device_many([(rows, torch.int64), (src, torch.int64)])
        inputs.input_ids[rows_t] = prev.sampled_device[src_t]
        return None

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, handle: StepHandle) -> None:
        if len(inputs.sample_rows) == hidden.shape[0]:
            picked = hidden  # every row samples (decode steps): no gather needed
        else:
            picked = hidden[self.arena.to_device(inputs.sample_rows, torch.int64)]
        logits = self.model.compute_logits(picked)  # [num_sampling, vocab] float32
        states = [self.batch.states[rid] for rid in inputs.sample_req_ids]
        if any(s.num_pending for s in states) and any(_needs_history(s) for s in states):
            # Penalties read earlier output ids: wait for the previous step's tokens.
            assert self._last_handle is not None
            self.finish(self._last_handle)
        batch = SamplingBatch(
            params=[s.sampling_params for s in states],
            prompt_token_ids=[s.prompt_token_ids for s in states],
            output_token_ids=[s.output_token_ids for s in states],
            stop_token_ids=[s.stop_token_ids for s in states],
            noise_seeds=self._noise_seeds(states),
        )
        out = self.sampler(logits, batch)
        sampled = out.sampled_token_ids  # [num_sampling] int64, on the device
        handle.sampled_device = sampled
        if self.device.type == "cuda":
            # NOTE: on a stream of its own, so the next step's kernels need not queue behind
            # the copy (and its switch to the copy engine) between two steps.
            handle.sampled_host = self.arena.host(sampled.numel(), torch.int64)
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._d2h):
                handle.sampled_host.copy_(sampled, non_blocking=True)
                handle.copied = torch.cuda.Event()
                handle.copied.record()
            sampled.record_stream(self._d2h)
        else:
            handle.sampled_host = sampled
        for state, lp in zip(states, out.logprobs):
            state.add_placeholder()
            if lp is not None:
                handle.logprobs[state.req_id] = lp

    def _noise_seeds(self, states: list[CachedRequestState]) -> list[int]:
        keys = self._noise_rng.integers(0, 2**63, size=len(states)).tolist()
        for i, state in enumerate(states):
            seed = state.sampling_params.seed
            if seed is not None:
                # NOTE: keyed by (seed, output position), so a seeded request draws the same
                # noise whatever its batch and even when it is preempted and recomputed.
                position = len(state.output_token_ids)
                keys[i] = (seed * 1_000_003 + position) % (2**63)
        return keys

    def _prompt_logprobs(
        self, hidden: torch.Tensor, inputs: StepInputs
    ) -> dict[str, list[TokenLogprobs]]:
        result: dict[str, list[TokenLogprobs]] = {}
        for rid, (row0, rows, first_pos) in inputs.prompt_logprob_spans.items():
            state = self.batch.states[rid]
            logits = self.model.compute_logits(hidden[row0 : row0 + rows])  # [rows, vocab]
            targets = torch.tensor(
                state.token_ids[first_pos : first_pos + rows], device=self.device
            )
            result[rid] = compute_prompt_logprobs(
                logits, targets, state.sampling_params.prompt_logprobs or 0
            )
        return result


@dataclass
class StepHandle:
    """A launched step. Its sampled ids are on the device at once and on the host after
    `copied`; `ModelRunner.finish` turns it into the step's ModelOutput."""

    req_ids: list[str]  # batch order
    sample_req_ids: list[str]  # requests that sample, in sampled-row order
    sampled_device: torch.Tensor | None = None  # [num_sampling] int64
    sampled_host: torch.Tensor | None = None  # [num_sampling] int64, pinned on GPU
    copied: torch.cuda.Event | None = None
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    result: ModelOutput | None = None


def _needs_history(state: CachedRequestState) -> bool:
    p = state.sampling_params
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


def _select_backend(name: str, device: torch.device):
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        from kestrel.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "torch":
        from kestrel.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "reference":
        from kestrel.attention.reference import ReferenceAttentionBackend

        return ReferenceAttentionBackend()
    raise ValueError(f"attention_backend must be auto, triton, torch or reference, got {name!r}")
