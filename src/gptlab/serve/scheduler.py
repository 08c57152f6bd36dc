"""Continuous batching: every running request shares one model, one decoding step at a time.

The scheduler owns the model and a SlotKVCache (gptlab.model) and runs in its own thread, so the
server's event loop never waits for the model. Its loop, once per step:

1. drops the choices whose client went away (a Job's `cancelled` event), finishing them as cancelled;
2. answers queued /v1/explain requests (one forward each);
3. admits waiting jobs while slots are free (FIFO), prefills their prompts -- one job through the
   batch-1 path, several together as one right-padded batch -- and draws each new choice's first token;
4. runs one decoding step for every running choice together (`GPTModel.forward_slots`: each row at
   its own position in its own slot), draws each choice's next token with its own settings and
   generator, and hands the results to the waiting requests;
5. frees the slots of finished choices, moving the highest running slots into the holes so that the
   running choices always fill slots 0..B-1 (one slice of the cache per step).

A lone running choice (B = 1) decodes through the plain single-sequence path on a view of its slot,
exactly as `generate` does (including gptlab's C kernel on CPU), so its tokens are `generate`'s.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

import torch

from ..model import GPTModel
from ..tokenizer import Tokenizer, tokenizer_of
from .sequence import Delta, Failure, Job, PromptScores, Sequence
from .tokens import TokenLogprob, explain, logprobs_at

log = logging.getLogger("gptlab.serve")


class QueueFull(Exception):
    """More waiting requests than the server's --max-queue."""


class Scheduler:
    """Runs Jobs on `model`, up to `max_batch` choices at once, with up to `max_queue` jobs waiting.

    `tokenizer` turns the drawn ids into text (default: the model's own, `tokenizer_of(model)`).
    """

    def __init__(self, model: GPTModel, max_batch: int = 16, max_queue: int = 64, eos_id: int | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        self.model, self.max_batch, self.max_queue, self.eos_id = model, max_batch, max_queue, eos_id
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)
        self.device = model.tok_emb.weight.device
        self.cache = model.make_slot_cache(1)  # grows (doubling) up to max_batch slots as requests come
        self.running: list[Sequence] = []  # running[i] holds slot i
        self.waiting: collections.deque[Job] = collections.deque()
        self.explains: collections.deque[tuple[Callable, Callable]] = collections.deque()
        self.cond = threading.Condition()
        self.counters = collections.Counter()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gptlab-decode", daemon=True)

    # --- called from the server's threads -------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request (all or none: QueueFull when they do not fit)."""
        with self.cond:
            if len(self.waiting) + len(jobs) > self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.extend(jobs)
            self.counters["submitted"] += len(jobs)
            self.cond.notify()

    def submit_explain(self, run: Callable[[], object], answer: Callable[[object], None]) -> None:
        """Run `run()` in the decoding thread between steps and pass its result (or exception) to `answer`."""
        with self.cond:
            self.explains.append((run, answer))
            self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.cache.slots,
                    "max_batch": self.max_batch, **{k: self.counters[k] for k in (
                        "submitted", "finished", "cancelled", "failed", "rejected", "steps", "tokens")}}

    # --- the decoding thread --------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.waiting or self.running or self.explains or self.stopping):
                        self.cond.wait()
                    if self.stopping and not (self.waiting or self.running or self.explains):
                        return
                    explains = list(self.explains)
                    self.explains.clear()
                self._drop_cancelled()
                self._free_finished()
                for run, answer in explains:
                    self._explain(run, answer)
                jobs = self._take_waiting()
                if jobs:
                    self._guarded(lambda jobs=jobs: self._admit(jobs), jobs)
                    self._free_finished()
                if self.running:
                    self._guarded(self._step, [])
                    self._free_finished()

    def _guarded(self, work: Callable[[], None], jobs: list[Job]) -> None:
        """Run a model step; if it fails, fail the requests it ran for (and `jobs`), not the server.

        The slots' contents are then unknown, so every running choice fails, not only the step's culprit.
        """
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - any failure of a step must reach its clients as an error
            log.exception("decoding step failed")
            message = f"the model failed while generating: {type(exc).__name__}: {exc}"
            self.running = [seq for seq in self.running if seq is not None]  # an admission cut short
            for seq in self.running:
                seq.finished = True
            for job in {id(j): j for j in [*jobs, *(seq.job for seq in self.running)]}.values():
                if not job.failed and job.done < job.sampling.n:
                    job.failed = True
                    job.emit(Failure(message))
                    self._count_job(job, "failed", force=True)

    def _explain(self, run: Callable, answer: Callable) -> None:
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 - handed to the request that asked
            result = exc
        answer(result)

    def _drop_cancelled(self) -> None:
        with self.cond:
            gone = [job for job in self.waiting if job.cancelled.is_set()]
            for job in gone:
                self.waiting.remove(job)
        for job in gone:
            self._count_job(job, "cancelled", force=True)
        for seq in self.running:
            if not seq.finished and seq.job.cancelled.is_set():
                seq.finished = True
                if self._count_job(seq.job, "cancelled"):
                    log.info("%s cancelled at step %d: the client went away", seq.job.name, len(seq.tokens))

    def _count_job(self, job: Job, outcome: str, force: bool = False) -> bool:
        """Count a job once, when its last choice ends (or at once with `force`); True if counted now."""
        job.done = job.sampling.n if force else job.done + 1
        if job.done == job.sampling.n:
            self.counters[outcome] += 1
            return True
        return False

    def _take_waiting(self) -> list[Job]:
        jobs, free = [], self.max_batch - len(self.running)
        with self.cond:
            while self.waiting and self.waiting[0].sampling.n <= free:
                job = self.waiting.popleft()
                free -= job.sampling.n
                jobs.append(job)
        return jobs

    def _admit(self, jobs: list[Job]) -> None:
        first = len(self.running)
        needed = first + sum(job.sampling.n for job in jobs)
        if needed > self.cache.slots:
            self.cache.grow(min(self.max_batch, max(needed, 2 * self.cache.slots)))
        logits = self._prefill(jobs, first)  # job j's prompt fills slot first + j
        extra = first + len(jobs)  # further choices of a job get copies of its prompt's slot
        for j, job in enumerate(jobs):
            if job.sampling.prompt_logprobs is not None:
                job.emit(self._prompt_scores(job))
            for choice in range(job.sampling.n):
                seq = Sequence(job, choice, self.eos_id, self.device, self.tokenizer)
                seq.slot = first + j if choice == 0 else extra
                if choice:
                    self.cache.move(first + j, extra)
                    extra += 1
                self._insert(seq)
                if job.sampling.max_tokens == 0:  # nothing to generate (echo, scoring the prompt)
                    self._finish(seq, Delta(seq.index, finish_reason="length"))
                else:
                    self._deliver(seq, seq.advance(logits[j : j + 1]))

    def _prompt_scores(self, job: Job) -> PromptScores:
        """echo + logprobs: each prompt token's logprob given the tokens before it (one full forward)."""
        logits = self.model(torch.tensor([job.prompt], device=self.device))[0, :-1]
        scores = logprobs_at(logits, job.prompt[1:], job.sampling.prompt_logprobs) if len(job.prompt) > 1 else []
        first = TokenLogprob(job.prompt[0], None, None)  # nothing before it to score it by
        return PromptScores(range(job.first_index, job.first_index + job.sampling.n), [first, *scores])

    def _insert(self, seq: Sequence) -> None:
        while len(self.running) <= seq.slot:
            self.running.append(None)  # type: ignore[arg-type]  # filled by the loop below
        self.running[seq.slot] = seq

    def _prefill(self, jobs: list[Job], first: int) -> torch.Tensor:
        """Logits (J, V) after each job's prompt, written into slots first..first+J-1."""
        if len(jobs) == 1:  # the single-sequence path, as `generate` runs a prompt
            view = self.cache.view(first)
            view.length = 0
            ids = torch.tensor([jobs[0].prompt], device=self.device)
            logits = self.model(ids, kv_cache=view, last_only=True)[:, -1]
            self.cache.lengths[first] = view.length
            return logits
        counts = [len(job.prompt) for job in jobs]
        ids = torch.zeros((len(jobs), max(counts)), dtype=torch.long)
        for j, job in enumerate(jobs):
            ids[j, : counts[j]] = torch.tensor(job.prompt)
            self.cache.lengths[first + j] = 0
        return self.model.forward_slots(ids.to(self.device), self.cache, first, counts)

    def _step(self) -> None:
        """One decoding step for every running choice (none has finished: _free_finished ran before)."""
        B = len(self.running)
        tokens = torch.tensor([[seq.last_token] for seq in self.running], device=self.device)
        start = time.perf_counter()
        if B == 1:
            view = self.cache.view(0)
            logits = self.model(tokens, kv_cache=view, last_only=True)[:, -1]
            self.cache.lengths[0] = view.length
        else:
            logits = self.model.forward_slots(tokens, self.cache, 0)
        self.counters["steps"] += 1
        self.counters["step_us"] += int(1e6 * (time.perf_counter() - start))
        for i, seq in enumerate(self.running):
            self._deliver(seq, seq.advance(logits[i : i + 1]))

    def _deliver(self, seq: Sequence, delta: Delta) -> None:
        self.counters["tokens"] += 1
        if seq.finished:
            self._finish(seq, delta)
        else:
            seq.job.emit(delta)

    def _finish(self, seq: Sequence, delta: Delta) -> None:
        seq.finished = True
        seq.job.emit(delta)
        self._count_job(seq.job, "finished")

    def _free_finished(self) -> None:
        """Forget finished choices; the highest running slots move into the holes (slots stay 0..B-1)."""
        if not any(seq.finished for seq in self.running):
            return
        keep = [seq for seq in self.running if not seq.finished]
        holes = [i for i, seq in enumerate(self.running) if seq.finished and i < len(keep)]
        movers = [seq for seq in keep if seq.slot >= len(keep)]
        for hole, seq in zip(holes, movers, strict=True):
            self.cache.move(seq.slot, hole)
            seq.slot = hole
        with self.cond:
            self.running = sorted(keep, key=lambda seq: seq.slot)


def explain_job(model: GPTModel, prompt: list[int], temperature: float, top_k: int | None, top_p: float | None,
                candidates: int, tokenizer: Tokenizer) -> Callable[[], dict]:
    """The work of POST /v1/explain: the next-token distribution after `prompt` (run in the decoding thread)."""

    def run() -> dict:
        ids = torch.tensor([prompt], device=model.tok_emb.weight.device)
        logits = model(ids, last_only=True)[0, -1]
        return explain(logits, temperature, top_k, top_p, candidates, tokenizer)

    return run
