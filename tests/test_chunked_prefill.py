"""Chunked prefill: a long prompt goes through a chunk at a time, the running streams' tokens in between, with the
same result as one pass."""

from __future__ import annotations

import asyncio
import threading

import pytest

import flashmoe
from flashmoe.scheduler import Finished, QueueFull, SamplingParams, Scheduler

LONG = list(range(5, 65))  # 60 prompt tokens


@pytest.fixture(scope="module")
def model(built):
    m = flashmoe.load(built.store("qwen3_5_moe", 4), cache_gb=0.01)
    yield m
    m.close()


def test_chunks_give_the_tokens_one_pass_gives(model):
    whole = list(model.generate(LONG, 8, stop_token_ids=[]))
    steps = list(model.generate(LONG, 8, stop_token_ids=[], prefill_chunk=7))
    assert steps.count(None) == 8  # after each of the 9 chunks but the last
    assert [t for t in steps if t is not None] == whole


def test_a_long_prompt_lets_a_running_stream_go_on(model):
    """Stream A runs; B arrives with a 60-token prompt. In chunks of 4, A makes tokens while B's prompt goes through
    (in one pass, A would wait for all of it): the order in which the worker hands out tokens shows it."""
    order, lock, names = [], threading.Lock(), {}

    def record(job, name):
        names[job.id] = name

    async def run(prefill_chunk) -> int:
        order.clear()
        scheduler = Scheduler(model, max_active=2, prefill_chunk=prefill_chunk)
        send = scheduler._send

        def sent(job, item):  # the order in which the worker hands out tokens
            with lock:
                order.append(names.get(job.id, "?"))
            send(job, item)
        scheduler._send = sent
        scheduler.start()
        try:
            a = scheduler.submit([5, 6, 7], SamplingParams(max_tokens=40, temperature=0.0))
            record(a, "A")
            events = a.events()
            await events.__anext__()  # A is running
            with lock:
                order.append("B arrives")
            b = scheduler.submit(LONG, SamplingParams(max_tokens=2, temperature=0.0))
            record(b, "B")
            async for item in b.events():
                if isinstance(item, Finished):
                    break
            async for item in events:
                if isinstance(item, Finished):
                    break
        finally:
            scheduler.stop()
        after = order[order.index("B arrives"):]
        return after[:after.index("B")].count("A")  # A's tokens while B's prompt went through

    assert asyncio.run(run(None)) <= 3  # the round it arrives in (and the event loop's lag)
    assert asyncio.run(run(4)) >= 10  # 15 chunks, A's turn between each


def test_the_worker_can_be_the_thread_that_loaded_the_model(model, monkeypatch):
    """run(): the caller's thread steps the requests (flashmoe serve's main thread, which loaded the model: on the CPU
    a second thread decoded at half the speed) while an event loop in another thread submits and reads; a stop()
    from there ends run(), a request still running hears why, and later ones are refused."""
    scheduler = Scheduler(model, max_active=1)
    stepped_in, step = set(), model.step
    monkeypatch.setattr(model, "step", lambda seqs: (stepped_in.add(threading.current_thread()), step(seqs))[1])
    seen = {}

    async def client():
        scheduler.start()  # an app's start-up: nothing, run() is the worker
        a = scheduler.submit([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))
        seen["a"] = [item async for item in a.events()]
        b = scheduler.submit([5, 6, 7], SamplingParams(max_tokens=100_000, temperature=0.0))
        events = b.events()
        await events.__anext__()
        scheduler.stop()
        seen["b"] = [item async for item in events][-1]
        with pytest.raises(QueueFull, match="shutting down"):
            scheduler.submit([5], SamplingParams(max_tokens=1))

    scheduler.runs_in_caller = True  # as `flashmoe serve` sets it: the app's start-up may come before run()
    loop = threading.Thread(target=lambda: asyncio.run(client()))
    loop.start()
    scheduler.run()
    loop.join(timeout=60)
    assert stepped_in == {threading.current_thread()} and not scheduler._thread.is_alive()
    assert 2 <= len(seen["a"]) <= 5 and seen["a"][-1].reason in ("length", "stop")
    assert seen["b"] == Finished("cancelled", "the server is shutting down")


def test_a_rounds_tokens_reach_the_event_loop_in_one_wake(model, monkeypatch):
    """A batched round's tokens (and the Finished of jobs that end in it) go to the event loop in one call, in order
    per job: each client gets what it gets alone."""
    from flashmoe import scheduler as scheduler_module

    deliveries, deliver = [], scheduler_module._deliver_soon
    monkeypatch.setattr(scheduler_module, "_deliver_soon",
                        lambda loop, items: (deliveries.append(len(items)), deliver(loop, items))[1])
    prompts = [[5, 6, 7], [9, 8, 7], [40, 41, 42]]
    alone = [list(model.generate(p, 5, stop_token_ids=[])) for p in prompts]

    async def run():
        scheduler = Scheduler(model, max_active=3, batch_steps=True)
        jobs = [scheduler.submit(p, SamplingParams(max_tokens=5, temperature=0.0)) for p in prompts]
        scheduler.start()  # after the submits: the first round takes all three
        try:
            return [[item async for item in job.events()] for job in jobs]
        finally:
            scheduler.stop()

    got = asyncio.run(run())
    assert [events[:-1] for events in got] == alone
    assert all(events[-1] == Finished("length") for events in got)
    assert deliveries == [3, 3, 3, 3, 6]  # a token each a round; the last round's tokens and the three ends
