"""The request queue: one worker thread generates for batches of waiting requests, in arrival order.

Requests wait in a bounded queue (a full queue is a 503). When the worker is free it takes up to
``max_batch`` waiting requests and decodes them together until each has finished; requests that
arrive meanwhile wait for the next batch. Each request has a deadline; the asyncio side is its
clock: on timeout, or when the client goes away, it cancels the job, and the worker drops it
from the batch after the current token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import torch

from .errors import APIError, queue_full, timed_out
from .generate import Chunk, SamplingParams, stream_batch

log = logging.getLogger("serve")

POLL_S = 0.25  # how often a waiting request checks its client's connection
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BATCH = 32
DEFAULT_TIMEOUT_S = 300.0


class Job:
    """One request in the engine; its chunks reach the event loop through an asyncio queue."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout
        self._timeout = timeout
        self._chunks: asyncio.Queue[Chunk | APIError] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.finished = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def post(self, item: Chunk | APIError) -> None:
        """Hand a chunk or an error to the waiting request (called from the worker thread)."""
        self.finished = isinstance(item, APIError) or item.finish_reason is not None
        try:
            self._loop.call_soon_threadsafe(self._chunks.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            self.cancel()

    async def chunks(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Chunk]:
        """The job's chunks until the finishing one; raises APIError on timeout or a worker error.

        ``disconnected`` (if given) is polled while waiting; when it reports True the job is
        cancelled and the iteration ends. Leaving the iteration early cancels the job.
        """
        next_poll = self._loop.time() + POLL_S if disconnected is not None else float("inf")
        try:
            while True:
                now = self._loop.time()
                if now >= self._deadline:
                    raise timed_out(self._timeout)
                if now >= next_poll:
                    if await disconnected():
                        return
                    next_poll = now + POLL_S
                try:
                    item = await asyncio.wait_for(self._chunks.get(), min(self._deadline, next_poll) - now)
                except TimeoutError:
                    continue
                if isinstance(item, APIError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel()


class Engine:
    """A model, its tokenizer and the worker thread that serves queued jobs."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_queue: int = DEFAULT_MAX_QUEUE,
                 timeout: float = DEFAULT_TIMEOUT_S, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.timeout = timeout
        self.max_batch = max_batch
        self.context_length = int(model.config.max_position_embeddings)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch: list[Job] = []
        self.generated_tokens = 0

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._work, name="bitbybit-generate", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker after its current token; waiting requests get a 503."""
        self._stopping.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post(APIError(503, "The server is shutting down.", type="server_error", code="shutting_down"))
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def waiting(self) -> int:
        """Requests queued for the next batch."""
        return self._queue.qsize()

    @property
    def running(self) -> int:
        """Requests in the batch being generated that have neither finished nor been cancelled."""
        return sum(not (job.finished or job.cancelled) for job in self._batch)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Job:
        """Queue a job (call from the event loop); a full queue raises the 503 APIError."""
        if self._stopping.is_set():
            raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        job = Job(prompt_ids, params, self.timeout)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise queue_full(self.max_queue) from None
        return job

    def _work(self) -> None:
        while not self._stopping.is_set():
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch or self._stopping.is_set():
                return
            jobs = [job for job in batch if not job.cancelled]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        chunks = stream_batch(self.model, self.tokenizer, [(job.prompt_ids, job.params) for job in jobs],
                              self.eos_ids, lambda i: not (jobs[i].cancelled or self._stopping.is_set()))
        counted = [0] * len(jobs)
        self._batch = jobs
        try:
            for i, chunk in chunks:
                self.generated_tokens += chunk.tokens - counted[i]
                counted[i] = chunk.tokens
                jobs[i].post(chunk)
        except Exception:
            log.exception("generation failed")
            for job in jobs:
                job.post(APIError(500, "Generation failed inside the server; see the server log.", type="server_error"))
        finally:
            chunks.close()
            self._batch = []


def eos_token_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's EOS and the model's generation config EOS ids."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return frozenset(ids)
