"""Executor: where the model runs. The engine hands it `SchedulerOutput`s and gets
`ModelOutput`s back, without knowing whether one process or several ranks do the work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from kestrel.config import EngineConfig
from kestrel.outputs import ModelOutput
from kestrel.scheduler.output import SchedulerOutput


class Executor(ABC):
    """Runs model steps.

    Invariants: `initialize(num_blocks)` is called once, after `determine_num_blocks()` and
    before the first `execute`; `execute` is called with every SchedulerOutput in order (even
    empty ones, which carry finished ids) and returns results in the output's batch order.
    """

    vocab_size: int

    @abstractmethod
    def determine_num_blocks(self) -> int: ...

    @abstractmethod
    def initialize(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput: ...

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput) -> Any:
        """Start a step without waiting for its tokens; pass the handle to `finish`."""

    @abstractmethod
    def finish(self, handle: Any) -> ModelOutput: ...


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        from kestrel.runner.model_runner import ModelRunner

        self.runner = ModelRunner(config.model, config.cache, config.scheduler)
        self.vocab_size = self.runner.vocab_size

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        return self.runner.execute(scheduler_output)

    def launch(self, scheduler_output: SchedulerOutput) -> Any:
        return self.runner.launch(scheduler_output)

    def finish(self, handle: Any) -> ModelOutput:
        return self.runner.finish(handle)
