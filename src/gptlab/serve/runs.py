"""One HTTP request's jobs in the scheduler, and the scheduler's events for them as an async stream.

The scheduler thread calls `emit`; events cross into the server's event loop through
`call_soon_threadsafe`, so neither side ever waits for the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .protocol import ApiError, Sampling
from .sequence import Delta, Failure, Job


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Run:
    """The jobs of one request (one per prompt, n choices each) and their events."""

    def __init__(self, prompts: list[list[int]], samplings: list[Sampling], name: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        n = samplings[0].n
        self.jobs = [Job(p, s, self.emit, first_index=i * n, name=name)
                     for i, (p, s) in enumerate(zip(prompts, samplings, strict=True))]
        self.total = len(prompts) * n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.finished = self.cancelled = False

    def emit(self, event: object) -> None:
        """Called from the scheduler thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody waits for this any more
            pass

    def cancel(self) -> None:
        """Tell the scheduler to drop this request's choices at its next step (no-op once finished)."""
        if not self.finished:
            self.cancelled = True
            for job in self.jobs:
                job.cancelled.set()

    async def events(self) -> AsyncIterator[object]:
        """Deltas (and PromptScores) until every choice has finished; a Failure raises a 500 ApiError."""
        done = 0
        while done < self.total:
            event = await self.queue.get()
            if isinstance(event, Failure):
                self.finished = True
                raise ApiError(event.message, status=500, type="server_error")
            if isinstance(event, Delta):
                self.completion_tokens += event.token_id is not None
                done += event.finish_reason is not None
            yield event
        self.finished = True


async def _disconnected(receive) -> None:
    """Returns when the client disconnects (the body has been read, so only that message can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive, run: Run, work) -> object:
    """Await `work` (a coroutine); if the client goes away first, cancel it and the run and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    run.cancel()
    raise ClientGone
