"""Step 04's engine: step 02's request plumbing around a step loop on a dedicated engine thread.

Reused from step 02 (``QueueEngine``): ``generate`` (an :class:`Entry` on ``waiting``, tokens read
from its queue until ``DONE``), ``abort`` / ``_drop`` (set ``entry.cancelled``; a request still in
``waiting`` leaves at once), ``shutdown``. Changed: ``_work`` no longer runs requests; it hands
each one to the engine thread's inbox and keeps it in ``running`` (entries in flight) until its
``DONE`` comes back.

The engine thread owns the :class:`Scheduler` and the :class:`ModelRunner`; nothing else touches
them. Each step: drop cancelled sequences (their rows are free for this very step), schedule, one
forward, one ``sample()`` for every row that produces a token, update, and ONE
``loop.call_soon_threadsafe`` carrying all the step's events to the event loop. A dedicated thread
rather than ``asyncio.to_thread`` per step: the next step starts as soon as this one ends, not when
the event loop (busy streaming the last step's tokens) gets round to it; ``measure.py --handoff``
compares the two.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

import torch

from shared.config import ModelConfig
from shared.engine import GenerationRequest, ModelInfo, TokenEvent
from shared.models import LoadedModel, model_info
from shared.sampling import make_generator, sample
from step02_queue.engine import DONE, Entry, QueueEngine
from step04_kvcache.model_runner import ModelRunner, RunnerConfig
from step04_kvcache.observer import EngineObserver, NullObserver, RequestStats, StepStats
from step04_kvcache.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from step04_kvcache.sequence import Sequence

log = logging.getLogger("step04_kvcache")
Outbox = list[tuple[Entry, Any]]  # (entry, TokenEvent | exception | DONE), in order


class ContinuousEngine(QueueEngine):
    def __init__(self, cfg: ModelConfig, sched: SchedulerConfig = SchedulerConfig(),
                 runner: RunnerConfig = RunnerConfig(), observer: EngineObserver | None = None) -> None:
        super().__init__(cfg)
        self.sched_cfg, self.runner_cfg = sched, runner
        self.observer: EngineObserver = observer or NullObserver()
        self.scheduler: Scheduler | None = None  # engine thread only
        self.runner: ModelRunner | None = None  # engine thread only
        self._inbox: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()  # None: stop
        self._entries: dict[Sequence, Entry] = {}  # engine thread only
        self._outbox: Outbox = []  # engine thread only: this step's events
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: ModelInfo | None = None

    async def start(self) -> None:
        await super().start()  # step 01: load the weights; step 02: start the _work task
        lm = self.load_for_request()
        explicit = self.cfg.max_model_len > 0
        self.runner = await asyncio.to_thread(self._build_runner, lm, explicit)
        self.scheduler = self._build_scheduler(self.runner, lm)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="step04-engine", daemon=True)
        self._thread.start()
        # Ready (/health 200) only now, and with the context the cache rows really hold.
        self._ready = dataclasses.replace(model_info(lm), max_model_len=self.runner.max_len)

    def info(self) -> ModelInfo | None:
        return self._ready

    # ---- factory hooks: a later step (step 07's paged cache) overrides these, nothing else ----

    def _build_runner(self, lm: LoadedModel, explicit_len: bool) -> ModelRunner:
        """The model side: our Transformer and its KV cache (runs off the event loop)."""
        return ModelRunner.build(lm, self.sched_cfg, self.runner_cfg, explicit_len)

    def _build_scheduler(self, runner: ModelRunner, lm: LoadedModel) -> Scheduler:
        return Scheduler(self.sched_cfg, runner.max_len, lm.eos_token_ids)

    def _new_sequence(self, r: GenerationRequest) -> Sequence:
        return Sequence(r.request_id, r.prompt_token_ids, r.params, r.arrival_time,
                        make_generator(r.params, self.runner.device))

    def _token_event(self, seq: Sequence, logprob: Any, top_logprobs: Any) -> TokenEvent:
        """The event for ``seq``'s newest token."""
        return TokenEvent(seq.output_token_ids[-1], logprob, top_logprobs, seq.finish_reason)

    async def _work(self) -> None:
        """On the event loop: hand each new request to the engine thread."""
        while True:
            await self._next_waiting()
            while self.waiting:
                entry = self.waiting.popleft()
                self.running.append(entry)
                self._inbox.put(entry)

    def _deliver(self, items: Outbox) -> None:
        """On the event loop: one call per step, with every event of the step."""
        for entry, item in items:
            entry.out.put_nowait(item)
            if item is DONE and entry in self.running:
                self.running.remove(entry)

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        assert self.scheduler is not None
        try:
            with torch.inference_mode():
                while self._admit(block=not self.scheduler.has_work()):
                    if self.scheduler.has_work():
                        self._step()
                    self._flush()  # requests refused at admission, or a step that failed
        except BaseException:
            log.exception("engine thread failed")
            raise
        finally:  # stopping (or crashed): nobody may wait forever
            for seq in [*self.scheduler.waiting, *self.scheduler.running]:
                self.scheduler.finish(seq, "abort")
                self._retire(seq)
            self._flush()

    def _admit(self, block: bool) -> bool:
        """Move new requests from the inbox into the scheduler; False once told to stop."""
        try:
            entry = self._inbox.get(block=block)
            while entry is not None:
                self._add(entry)
                entry = self._inbox.get_nowait()
            return False
        except queue.Empty:
            return True

    def _add(self, entry: Entry) -> None:
        seq = self._new_sequence(entry.request)
        try:
            self.scheduler.add(seq)
        except ValueError as e:
            self._outbox += [(entry, e), (entry, DONE)]
            return
        self._entries[seq] = entry

    def _step(self) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        for seq, entry in list(self._entries.items()):  # aborted: out of the batch, row freed
            if entry.cancelled.is_set():
                self.scheduler.finish(seq, "abort")
                self._retire(seq, now)
        out = self.scheduler.schedule()
        if out.is_empty:
            return
        for chunk in out.prefills:  # a prompt's first chunk: its queue time ends (for the observer)
            if chunk.seq.first_scheduled_time is None:  # (not start == 0: a cached prefix starts later)
                chunk.seq.first_scheduled_time = now
        t1 = time.perf_counter()
        rows = out.sampling_seqs
        try:
            inputs = self.runner.prepare(out)
            t2 = time.perf_counter()
            logits = self.runner.forward(inputs)  # [len(rows), vocab]
            t3 = time.perf_counter()
            tokens = sample(logits, [s.params for s in rows], [s.output_token_ids for s in rows],
                            [s.generator for s in rows], self.scheduler.eos_token_ids) if rows else None
        except Exception as e:  # the step's requests fail; the engine goes on
            log.exception("step failed")
            self._fail(out, e)
            return
        t4 = time.perf_counter()
        self._emit(out, rows, tokens)
        self._flush()
        self.observer.on_step(self._step_stats(out, len(rows), (t0, t1, t2, t3, t4)))

    def _emit(self, out: SchedulerOutput, rows: list[Sequence], s: Any) -> None:
        finished = self.scheduler.update(out, s.token_ids if rows else [])
        now = time.monotonic()
        for k, seq in enumerate(rows):
            if seq.first_token_time is None:
                seq.first_token_time = now
            event = self._token_event(seq, s.logprobs[k], s.top_logprobs[k])
            self._outbox.append((self._entries[seq], event))
        self.generated_tokens += len(rows)
        for seq in finished:
            self._retire(seq, now)

    def _fail(self, out: SchedulerOutput, error: Exception) -> None:
        for seq in [*out.decodes, *(c.seq for c in out.prefills)]:
            self.scheduler.finish(seq, "error")
            self._outbox.append((self._entries[seq], error))
            self._retire(seq)

    def _retire(self, seq: Sequence, now: float | None = None) -> None:
        """A finished sequence: its client gets DONE, the observer its numbers."""
        seq.finish_time = time.monotonic() if now is None else now
        self._outbox.append((self._entries.pop(seq), DONE))
        self.observer.on_request_finished(RequestStats(
            seq.request_id, seq.arrival_time, seq.first_token_time, seq.finish_time, seq.num_prompt_tokens,
            seq.num_output_tokens, seq.finish_reason or "abort", seq.first_scheduled_time))

    def _flush(self) -> None:
        """Hand this step's events to the event loop: one call, however many requests."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _step_stats(self, out: SchedulerOutput, sampled: int, t: tuple[float, ...]) -> StepStats:
        s = self.scheduler
        return StepStats(
            time=time.monotonic(), num_decode_seqs=len(out.decodes), num_prefill_seqs=len(out.prefills),
            num_prefill_tokens=out.num_prefill_tokens, num_sampled=sampled, num_running=len(s.running),
            num_waiting=len(s.waiting), kv_slots_used=s.num_used_slots, kv_slots_total=s.config.max_seqs,
            schedule_s=t[1] - t[0], prepare_s=t[2] - t[1], model_s=t[3] - t[2], sample_s=t[4] - t[3],
            step_s=time.perf_counter() - t[0])

    # ---- anywhere -----------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """For /health; read from the event loop while the engine thread runs (len() is atomic)."""
        pending = len(self.waiting) + self._inbox.qsize()
        s = self.scheduler
        if s is None:
            return {"running": 0, "waiting": pending, "generated_tokens": self.generated_tokens}
        used = s.num_used_slots
        return {"running": len(s.running), "waiting": len(s.waiting) + pending, "kv_slots_used": used,
                "kv_slots_total": s.config.max_seqs, "kv_usage": used / s.config.max_seqs,
                "generated_tokens": self.generated_tokens}

    async def shutdown(self) -> None:
        await super().shutdown()  # stops _work, marks every request cancelled
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
