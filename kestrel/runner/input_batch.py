"""The runner's persistent per-request state and the flat varlen inputs built from it each step.

Owns: token ids, block tables and sampling state of every request the runner holds, updated
only from `SchedulerOutput` diffs, and the conversion of one step into model inputs and
`AttentionMetadata`. Must not decide anything the scheduler decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kestrel.attention.backend import AttentionMetadata
from kestrel.request import PLACEHOLDER
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler.output import SchedulerOutput


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    stop_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    # Prompt logprobs are produced only on the first pass over the prompt.
    wants_prompt_logprobs: bool = False
    token_ids: list[int] = field(default_factory=list)  # prompt + output

    num_pending: int = 0  # trailing output tokens sampled by a step not yet read back

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    def add_placeholder(self) -> None:
        self.output_token_ids.append(PLACEHOLDER)
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def resolve_placeholder(self, token_id: int) -> None:
        pos = len(self.output_token_ids) - self.num_pending
        self.output_token_ids[pos] = token_id
        self.token_ids[len(self.prompt_token_ids) + pos] = token_id
        self.num_pending -= 1


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    req_ids: list[str]  # batch order
    # Rows of the flat batch whose logits are sampled from, one per sampling request.
    sample_rows: list[int]
    sample_req_ids: list[str]
    # req_id -> (first row, number of rows, first target position) for prompt logprobs.
    prompt_logprob_spans: dict[str, tuple[int, int, int]]
    # Rows whose input token is a placeholder (sampled by the previous step, still on the
    # device), and their requests.
    placeholder_rows: list[int] = field(default_factory=list)
    placeholder_req_ids: list[str] = field(default_factory=list)


class InputBatch:
    def __init__(
        self,
        block_size: int,
        device: torch.device,
        max_tokens: int = 0,
        max_reqs: int = 0,
        max_blocks_per_req: int = 0,
        to_device_many: Callable[[list[tuple[Any, torch.dtype]]], list[torch.Tensor]]
        | None = None,
    ) -> None:
        """`to_device_many` ships a step's host arrays in one copy (the runner's StepArena);
        without it each input is copied on its own. Block tables are `max_blocks_per_req`
        wide when that is set."""
        self.block_size = block_size
        self.device = device
        self.states: dict[str, CachedRequestState] = {}
        self.max_blocks_per_req = max_blocks_per_req
        self._to_device_many = to_device_many

    def update(self, out: SchedulerOutput) -> None:
        for rid in out.finished_req_ids:
            self.states.pop(rid, None)
        for new in out.scheduled_new_reqs:
            self.states[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids),
                sampling_params=new.sampling_params,
                stop_token_ids=list(new.stop_token_ids),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                wants_prompt_logprobs=(
                    new.sampling_params.prompt_logprobs is not None and not new.output_token_ids
                ),
            )
        cached = out.scheduled_cached_reqs
        for rid, blocks, num_computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            state = self.states[rid]
            state.block_ids.extend(blocks)
            state.num_computed_tokens = num_computed

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Flatten the scheduled tokens of all requests into one varlen batch.

        Row layout (one request after another, batch order):
            rows  [qsl[0] ... qsl[1]) [qsl[1] ... qsl[2]) ...
            positions   nc0 .. nc0+n0-1   nc1 .. nc1+n1-1
        where nc = tokens already in the cache and n = tokens scheduled now.
        """
        bs = self.block_size
        # One-query requests first: attention backends run them with the decode kernel.
        req_ids = sorted(out.batch_req_ids(), key=lambda r: out.num_scheduled_tokens[r] != 1)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_req_ids: list[str] = []
        spans: dict[str, tuple[int, int, int]] = {}
        ph_rows: list[int] = []
        ph_reqs: list[str] = []
        for rid in req_ids:
            state = self.states[rid]
            n = out.num_scheduled_tokens[rid]
            start = state.num_computed_tokens
            end = start + n
            assert end <= len(state.token_ids), (rid, end, len(state.token_ids))
            assert len(state.block_ids) * bs >= end, (rid, len(state.block_ids), end)
            blocks = state.block_ids
            if n == 1:  # decode: the common case, kept cheap
                ids.append(state.token_ids[start])
                pos.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                ids.extend(state.token_ids[start:end])
                positions = range(start, end)
                pos.extend(positions)
                slots.extend(blocks[p // bs] * bs + p % bs for p in positions)
            row0 = qsl[-1]
            qsl.append(row0 + n)
            seq_lens.append(end)
            if end == len(state.token_ids):
                sample_rows.append(row0 + n - 1)
                sample_req_ids.append(rid)
                if state.num_pending:  # NOTE: only the last token can still be pending
                    ph_rows.append(row0 + n - 1)
                    ph_reqs.append(rid)
            if state.wants_prompt_logprobs:
                # Row r predicts token r+1; the last prompt token predicts the first output.
                num_prompt = len(state.prompt_token_ids)
                rows = min(end, num_prompt - 1) - start
                if rows > 0:
                    spans[rid] = (row0, rows, start + 1)
        tables = [self.states[r].block_ids for r in req_ids]
        input_ids, positions, slot_mapping, qsl_t, seq_lens_t, table_t = self._to_device(
            ids, pos, slots, qsl, seq_lens, tables
        )
        meta = AttentionMetadata(
            num_tokens=len(ids),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            query_start_loc=qsl_t,
            seq_lens=seq_lens_t,
            block_table=table_t,
            slot_mapping=slot_mapping,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            attn_metadata=meta,
            req_ids=req_ids,
            sample_rows=sample_rows,
            sample_req_ids=sample_req_ids,
            prompt_logprob_spans=spans,
            placeholder_rows=ph_rows,
            placeholder_req_ids=ph_reqs,
        )

    def _to_device(self, ids: list[int], pos: list[int], slots: list[int], qsl: list[int],
                   seq_lens: list[int], tables: list[list[int]]) -> list[torch.Tensor]:
        """Device tensors of the step's inputs. Block tables are right-padded with block 0
        (never read: seq_lens bound the reads)."""
        # NOTE: the table keeps a fixed width where one is set, so its row stride never
        # changes: Triton specializes kernels on integer arguments, and a new stride would
        # mean a recompile.
        width = max(map(len, tables))
        if self.max_blocks_per_req >= width:
            width = self.max_blocks_per_req
        table = np.zeros((len(tables), width), dtype=np.int32)
        for i, row in enumerate(tables):
            table[i, : len(row)] = row
        i64, i32 = torch.int64, torch.int32
        items = [(ids, i64), (pos, i64), (slots, i64), (qsl, i32), (seq_lens, i32), (table, i32)]
        if self._to_device_many is not None:
            return self._to_device_many(items)
        return [torch.as_tensor(np.asarray(data), dtype=dtype).to(self.device)
                for data, dtype in items]
