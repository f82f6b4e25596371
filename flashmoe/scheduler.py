"""One model, many clients: a worker thread that owns the model and runs its requests together.

Requests wait in arrival order; up to `max_active` run at once, each with its own sequence state. Every round
the worker makes one step of each (its next prompt chunk or its next token), so a long generation never starves a
short one; with `batch_steps` (by default where the model batches well: Model.batches_well), one forward for all
of them (Model.step: the weights and experts they need read once for all). A request whose client went away is
dropped at its next turn. The HTTP side never touches the model: it submits a job and reads the job's tokens from
an asyncio queue the worker fills.

The worker is a thread of its own (`start`), or the caller's (`run`): `flashmoe serve` runs it in the thread that
loaded the model. On the CPU that matters: libgomp keeps a team of OpenMP threads per thread that starts parallel
work, and once two teams exist (the loader's, the worker's) outnumber the cores, its threads stop spinning between
parallel regions; the shipped model then decoded at 94 tok/s in a second thread against 230 in the loading one
(2-core VM).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .errors import FlashMoeError, out_of_memory
from .sampling import TokenConstraint

TOKENS_PER_S_WINDOW_S = 10.0  # the tokens/s gauge averages over this many seconds
MODEL_STATS_EVERY_S = 0.5  # how often the worker copies the model's stats out for /metrics (reading them syncs the GPU)
# a long prompt goes through this many tokens at a time, the running streams' next tokens in between (chunked prefill)
DEFAULT_PREFILL_CHUNK = 512


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _deliver_soon(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Put (queue, item) pairs on their queues in `loop`'s thread: one wake of the loop for them all."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the event loop is gone (server shutting down)
        pass


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Finished:
    reason: str  # "stop", "length", "cancelled" or "error"
    error: str | None = None


class QueueFull(FlashMoeError):
    pass


class Job:
    """One request as the worker sees it. Tokens and the final `Finished` arrive through `events()`."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], params: SamplingParams, constraint: TokenConstraint | None,
                 loop: asyncio.AbstractEventLoop, keep_at: tuple[int, ...] = ()):
        self.id = next(self._ids)
        self.prompt_ids, self.params, self.constraint = prompt_ids, params, constraint
        self.keep_at = keep_at  # prompt positions where the prefix cache keeps the state (Model.generate)
        self.completion_tokens = 0
        self.last_token: int | None = None
        self.cancel_reason: str | None = None
        self._cancelled = threading.Event()
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.sequence = None  # the model's Sequence, made when the job starts running

    def cancel(self, reason: str | None = "cancelled") -> None:
        """Stop generating at the next turn; reason None means a normal end (say, a stop string was reached)."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _push(self, item) -> None:
        _deliver_soon(self._loop, [(self._queue, item)])

    async def events(self) -> AsyncIterator[int | Finished]:
        while True:
            item = await self._queue.get()
            yield item
            if isinstance(item, Finished):
                return


@dataclass
class SchedulerStats:
    waiting: int = 0
    active: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    tokens_per_s: float = 0.0


class Scheduler:
    def __init__(self, model, max_active: int = 4, max_waiting: int = 64,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, batch_steps: bool | None = None):
        if max_active < 1 or max_waiting < 0 or (prefill_chunk is not None and prefill_chunk < 1):
            raise FlashMoeError("need max_active >= 1, max_waiting >= 0 and prefill_chunk >= 1")
        self.model, self.prefill_chunk = model, prefill_chunk
        # one forward for all running requests a round, or one each. None: the model's faster way (Model.batches_well)
        self.batch_steps = batch_steps
        self.max_active, self.max_waiting = max_active, max_waiting
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._counts = SchedulerStats()
        self._token_times: collections.deque[float] = collections.deque()
        self._model_stats = dict(model.stats)  # the worker's copy; before it starts, this thread owns the model
        self._model_stats_at = time.perf_counter()
        self._outbox: list | None = None  # during a round: what it pushes, sent at its end in one wake per loop
        self._thread = threading.Thread(target=self._run, name="flashmoe-worker", daemon=True)
        self.runs_in_caller = False  # run(): the worker is a thread the caller provides

    def start(self) -> None:
        """The worker in a thread of its own; nothing if run() is (or will be) the worker in another thread."""
        if not self.runs_in_caller:
            self._thread.start()

    def run(self) -> None:
        """Be the worker in the calling thread until stop() (from another thread) or an exception (KeyboardInterrupt);
        set `runs_in_caller` before an app's start-up would call start()."""
        self.runs_in_caller = True
        self._run()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], params: SamplingParams, constraint: TokenConstraint | None = None,
               keep_at: tuple[int, ...] = ()) -> Job:
        """Queue a request (from the event loop's thread); raises QueueFull when max_waiting are waiting."""
        job = Job(prompt_ids, params, constraint, asyncio.get_running_loop(), keep_at)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_waiting and len(self._active) >= self.max_active:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting; retry later")
            self._waiting.append(job)
            self._wake.notify()
        return job

    @property
    def stats(self) -> SchedulerStats:
        with self._wake:
            now = time.perf_counter()
            while self._token_times and now - self._token_times[0] > TOKENS_PER_S_WINDOW_S:
                self._token_times.popleft()
            return SchedulerStats(**{**self._counts.__dict__, "waiting": len(self._waiting),
                                     "active": len(self._active),
                                     "tokens_per_s": len(self._token_times) / TOKENS_PER_S_WINDOW_S})

    @property
    def model_stats(self) -> dict:
        """The model's stats as the worker last copied them (at most MODEL_STATS_EVERY_S old while it works)."""
        with self._wake:
            return dict(self._model_stats)

    # ---- the worker thread ------------------------------------------------------------------
    def _copy_model_stats(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._model_stats_at >= MODEL_STATS_EVERY_S:
            stats = self.model.stats
            with self._wake:
                self._model_stats, self._model_stats_at = stats, now

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._active:
                        self._wake.wait()
                    if self._stopping:
                        break
                    while self._waiting and len(self._active) < self.max_active:
                        self._active.append(self._waiting.popleft())
                    running = list(self._active)
                batched = self.model.batches_well if self.batch_steps is None else self.batch_steps
                for group in [running] if batched else [[job] for job in running]:
                    self._round(group)
                self._copy_model_stats(force=not self._active)
        finally:  # stopped, or interrupted (Ctrl-C in run()): every client still waiting hears why
            with self._wake:
                self._stopping = True
                left = list(self._active) + list(self._waiting)
                self._waiting.clear()
            for job in left:
                self._end(job, Finished("cancelled", "the server is shutting down"))

    def _round(self, running: list[Job]) -> None:
        """One step of each of `running` in one forward; jobs that end leave the active list. What the round gives
        its clients goes to their event loop together at its end: a wake of the loop per token and client cost
        more than the rest of the server's work for the token (benchmarks/serve.py --no-engine)."""
        self._outbox = []
        try:
            self._step(running)
        finally:
            outbox, self._outbox = self._outbox, None
            for loop in {id(job._loop): job._loop for job, _ in outbox}.values():
                _deliver_soon(loop, [(job._queue, item) for job, item in outbox if job._loop is loop])

    def _send(self, job: Job, item) -> None:
        if self._outbox is None:
            job._push(item)
        else:
            self._outbox.append((job, item))

    def _step(self, running: list[Job]) -> None:
        jobs = [job for job in running if self._ready(job)]
        if not jobs:
            return
        try:
            rows = self.model.step([job.sequence for job in jobs])
        except Exception as exc:  # a broken store fails the jobs of this step, never the server
            for job in jobs:
                self._fail(job, exc)
            return
        for job, row in zip(jobs, rows):
            try:
                token = job.sequence.advance(row)
            except Exception as exc:  # a constraint's error is its own job's
                self._fail(job, exc)
                continue
            if token is not None:
                job.completion_tokens += 1
                job.last_token = token
                with self._wake:
                    self._counts.generated_tokens += 1
                    self._token_times.append(time.perf_counter())
                self._send(job, token)
            if job.sequence.done:
                last_was_stop = job.completion_tokens and job.last_token in self.model.eos_token_ids
                length = job.completion_tokens >= job.params.max_tokens and not last_was_stop
                self._end(job, Finished("length" if length else "stop"))

    def _ready(self, job: Job) -> bool:
        """Whether the job takes part in this round: started (its Sequence made) and neither cancelled nor bad."""
        if job.cancelled:
            self._end(job, Finished("stop") if job.cancel_reason is None else Finished("cancelled", job.cancel_reason))
            return False
        if job.sequence is None:
            p = job.params
            try:
                job.sequence = self.model.sequence(job.prompt_ids, p.max_tokens, p.temperature, p.top_p, p.top_k,
                                                   p.seed, constraint=job.constraint, prefill_chunk=self.prefill_chunk,
                                                   keep_at=job.keep_at)
                self.model._check_tokens(job.prompt_ids)  # here, so a bad id fails its job, not the round
            except Exception as exc:  # a bad request fails this job only
                self._fail(job, exc)
                return False
            with self._wake:
                self._counts.prompt_tokens += len(job.prompt_ids)
        return True

    def _fail(self, job: Job, exc: Exception) -> None:
        exc = out_of_memory(exc) or exc
        message = str(exc) if isinstance(exc, FlashMoeError) else f"{type(exc).__name__}: {exc}"
        self._end(job, Finished("error", message))

    def _end(self, job: Job, finished: Finished) -> None:
        if job.sequence is not None:
            job.sequence.close()  # keeps its state in the prefix cache where it may; the state is freed with it
            job.sequence = None
        with self._wake:
            if job in self._active:
                self._active.remove(job)
            if finished.reason == "cancelled":
                self._counts.requests_cancelled += 1
            elif finished.reason == "error":
                self._counts.requests_failed += 1
            else:
                self._counts.requests_finished += 1
        self._send(job, finished)
