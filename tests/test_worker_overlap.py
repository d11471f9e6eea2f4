"""Scoring off the engine's critical path: `GroupFeed` runs the engine's generator on the worker's
torch thread, so the engine keeps sampling while the worker scores what it finished; and every
piece of a worker's tensor work runs on that one thread.

    PYTHONPATH=$PWD python -m pytest -q tests/test_worker_overlap.py
"""
from __future__ import annotations

import threading
from typing import Iterator

import pytest

from rollout_workers.worker import GroupFeed, torch_thread

WAIT_S = 30.0
"""Deadlock guard only: a correct feed answers at once; a serial one never would."""


@pytest.fixture
def executor():
    pool = torch_thread("w")
    yield pool
    pool.shutdown(wait=True)


def test_engine_produces_the_next_group_while_the_consumer_scores(executor):
    produced_second = threading.Event()

    def engine() -> Iterator[int]:
        yield 0
        produced_second.set()  # runs only if the engine advances while item 0 is being consumed
        yield 1
        yield 2

    seen = []
    with GroupFeed(engine(), executor) as feed:
        for item in feed:
            if item == 0:
                # "Scoring" group 0 waits for the engine to have produced group 1: a serial loop
                # (score, then advance the engine) never gets there.
                assert produced_second.wait(WAIT_S)
            seen.append(item)
    assert seen == [0, 1, 2]  # production order, each item exactly once


def test_progress_callback_runs_as_items_leave_the_engine(executor):
    calls = []
    with GroupFeed((c for c in "abc"), executor, on_item=lambda k: calls.append((k, threading.current_thread().name)),
                   name="w") as feed:
        assert list(feed) == ["a", "b", "c"]
    assert calls == [(0, "w-torch_0"), (1, "w-torch_0"), (2, "w-torch_0")]


def test_engine_error_is_raised_after_the_groups_before_it(executor):
    def engine() -> Iterator[int]:
        yield 0
        yield 1
        raise ValueError("engine broke")

    seen = []
    with pytest.raises(ValueError, match="engine broke"):
        with GroupFeed(engine(), executor) as feed:
            for item in feed:
                seen.append(item)
    assert seen == [0, 1]


def test_leaving_early_stops_and_closes_the_engine_on_its_thread(executor):
    state = {"advanced_to": -1, "closed_on": None}
    gate = threading.Event()

    def engine() -> Iterator[int]:
        try:
            for k in range(1000):
                state["advanced_to"] = k
                yield k
                gate.wait(WAIT_S)  # the engine is slow: one chunk per release
        finally:
            state["closed_on"] = threading.current_thread().name

    with GroupFeed(engine(), executor, name="w") as feed:
        for item in feed:
            assert item == 0
            break  # the driver gave up on the batch
        gate.set()
    assert state["closed_on"] == "w-torch_0"  # generator closed where it ran, before the feed's exit returned
    assert state["advanced_to"] <= 1  # stopped after the chunk in progress, not run to the end


def test_cancel_while_waiting_for_the_engine_ends_the_stream(executor):
    release = threading.Event()
    cancelled = threading.Event()

    def engine() -> Iterator[int]:
        yield 0
        release.wait(WAIT_S)  # a long chunk
        yield 1

    seen = []
    with GroupFeed(engine(), executor, cancelled=cancelled.is_set) as feed:
        for item in feed:
            seen.append(item)
            cancelled.set()  # the driver cancels while the engine samples the next chunk
        release.set()
    assert seen == [0]


def test_engine_samples_with_the_threads_its_request_names(executor):
    """train.thread_handover: the engine's request carries its share of the cores; the count is
    in force while the engine runs on the feed's thread."""
    import torch

    from rollout_workers.worker import with_torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)

        def engine() -> Iterator[int]:
            yield torch.get_num_threads()
            yield torch.get_num_threads()

        with GroupFeed(with_torch_threads(2, engine()), executor) as feed:
            assert list(feed) == [2, 2]  # torch caps the count at the cores it sees (2 on CI)
    finally:
        torch.set_num_threads(before)
