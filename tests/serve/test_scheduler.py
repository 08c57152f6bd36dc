"""The continuous-batching scheduler in-process: batched equals alone, cancellation, failures, limits."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gptlab.generation.generate import generate
from gptlab.model import GPTModel
from gptlab.serve.protocol import Sampling
from gptlab.serve.scheduler import QueueFull, Scheduler
from gptlab.serve.sequence import Delta, Failure, Job
from gptlab.tokenizer import EOT_ID
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = GPTModel(tiny_config(context_length=128)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(8.0)
    return net


class Collector:
    """A job's emit callback: gathers its events, `wait()` until its choices have all finished."""

    def __init__(self, n: int = 1) -> None:
        self.events, self.n, self.finished = [], n, threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Failure) or sum(isinstance(e, Delta) and e.finish_reason is not None
                                             for e in self.events) == self.n:
            self.finished.set()

    def tokens(self, index: int = 0) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, Delta) and e.index == index and e.token_id is not None]

    def wait(self) -> None:
        assert self.finished.wait(60), "the job did not finish"


def job(prompt, max_tokens, n=1, **options) -> tuple[Job, Collector]:
    sink = Collector(n)
    return Job(prompt, Sampling(max_tokens=max_tokens, n=n, **options), sink), sink


def reference(model, prompt, max_tokens, eos_id=EOT_ID, **options) -> list[int]:
    out = generate(model, torch.tensor([prompt]), max_tokens, eos_id=eos_id, **options)
    return out[0, len(prompt):].tolist()


@pytest.fixture
def scheduler(model):
    s = Scheduler(model, max_batch=8, max_queue=16, eos_id=EOT_ID)
    s.start()
    yield s
    s.stop(timeout=30)
    assert not s.thread.is_alive()


def test_jobs_batched_together_equal_each_alone(model, scheduler):
    specs = [([5, 6, 7], 9, dict(temperature=0.0)), ([40, 41], 30, dict(temperature=0.9, seed=3)),
             ([1, 2, 3, 4, 5, 6, 7, 8], 17, dict(temperature=0.0)), ([99], 4, dict(temperature=1.2, top_k=20, seed=5)),
             ([7] * 20, 25, dict(temperature=0.7, top_p=0.9, seed=11))]
    jobs = [job(p, m, **o) for p, m, o in specs]
    scheduler.submit([j for j, _ in jobs])  # admitted together: one padded prefill, then shared steps
    for (prompt, max_tokens, options), (_, sink) in zip(specs, jobs, strict=True):
        sink.wait()
        assert sink.tokens() == reference(model, prompt, max_tokens, **options)
    stats = scheduler.stats()
    assert stats["finished"] == 5 and stats["running"] == 0
    assert stats["steps"] < stats["tokens"] / 2  # decoding steps were shared


def test_n_choices_share_one_prefill_and_draw_with_seed_plus_index(model, scheduler):
    j, sink = job([11, 12, 13], 12, n=3, temperature=1.0, seed=40)
    scheduler.submit([j])
    sink.wait()
    for i in range(3):
        assert sink.tokens(i) == reference(model, [11, 12, 13], 12, temperature=1.0, seed=40 + i)


def test_a_late_job_joins_the_running_batch(model, scheduler):
    long_job, long_sink = job([3, 4], 100, temperature=0.0, ignore_eos=True)
    scheduler.submit([long_job])
    while len(long_sink.events) < 5:
        time.sleep(0.001)
    late, late_sink = job([8, 9, 10], 10, temperature=0.0)
    scheduler.submit([late])
    late_sink.wait()
    assert not long_sink.finished.is_set()  # it joined the running batch rather than waiting for the long one
    long_sink.wait()
    assert late_sink.tokens() == reference(model, [8, 9, 10], 10, temperature=0.0)
    assert long_sink.tokens() == reference(model, [3, 4], 100, eos_id=None, temperature=0.0)


def test_a_cancelled_job_is_dropped_at_the_next_step(scheduler):
    j, sink = job([1, 2], 120, temperature=0.0, ignore_eos=True)
    scheduler.submit([j])
    while len(sink.events) < 3:
        time.sleep(0.001)
    j.cancelled.set()
    deadline = time.monotonic() + 10
    while scheduler.stats()["cancelled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert scheduler.stats()["cancelled"] == 1 and scheduler.stats()["running"] == 0
    assert len(sink.tokens()) < 120


def test_a_failing_step_fails_its_jobs_and_the_scheduler_goes_on(model, scheduler, monkeypatch):
    calls = {"n": 0}
    real = type(model).forward_slots

    def broken(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward_slots", broken)
    a, sink_a = job([1, 2, 3], 5, temperature=0.0)
    b, sink_b = job([4, 5], 5, temperature=0.0)
    scheduler.submit([a, b])  # two jobs: a batched prefill, which fails
    sink_a.wait()
    sink_b.wait()
    assert isinstance(sink_a.events[-1], Failure) and "simulated" in sink_a.events[-1].message
    assert isinstance(sink_b.events[-1], Failure)
    c, sink_c = job([6, 7], 5, temperature=0.0)
    scheduler.submit([c])
    sink_c.wait()
    assert len(sink_c.tokens()) == 5 and scheduler.stats()["failed"] == 2


def test_zero_max_tokens_finishes_at_once(scheduler):
    j, sink = job([1, 2, 3], 0, temperature=0.0)
    scheduler.submit([j])
    sink.wait()
    assert sink.tokens() == [] and sink.events[-1].finish_reason == "length"


def test_the_waiting_queue_is_bounded(model):
    s = Scheduler(model, max_batch=1, max_queue=2)  # not started: everything waits
    s.submit([job([1], 3)[0], job([2], 3)[0]])
    with pytest.raises(QueueFull, match="max-queue 2"):
        s.submit([job([3], 3)[0]])
    assert s.stats()["waiting"] == 2 and s.stats()["rejected"] == 1
