"""Batching of the calls a replica receives: :class:`CallBatcher`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class CallBatcher(Generic[In, Out]):
    """Calls that arrive while a batch runs wait and go together in the next one, run in a worker thread:
    a lone call waits for nothing, and under load the batches grow by themselves (``@serve.batch`` instead
    collects for a fixed time, which a lone call pays, and forms the next batch before the last is done).
    ``fn(items) -> results``, one per item; a result that is an exception is raised to that caller alone."""

    def __init__(self, fn: Callable[[list[In]], list[Out | BaseException]], max_batch: int):
        self.fn, self.max_batch = fn, max_batch
        self.pending: list[tuple[In, asyncio.Future]] = []
        self.running = False

    async def __call__(self, item: In) -> Out:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((item, fut))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        out = await fut
        if isinstance(out, BaseException):
            raise out
        return out

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                try:
                    results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                except Exception as e:  # the whole batch failed: every caller hears why
                    results = [e] * len(batch)
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            self.running = False
