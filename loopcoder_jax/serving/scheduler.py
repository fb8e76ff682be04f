"""Continuous batching: which request is prefilled, inserted and decoded when.

The scheduler owns the host side of a `SlotEngine`: a FIFO of pending requests, the request
in each slot, and the long prompt being prefilled. One `step()`:
  1. frees the slots of cancelled requests;
  2. admits requests from the head of the queue while slots are free, up to a prefill budget
     of `prefill_chunks` x C prompt tokens per step (padded): prompts of at most C tokens are
     grouped by length bucket and prefilled several to a call, straight into their slots
     (`SlotEngine.prefill_insert_async`); a longer prompt gets a slot and runs C tokens per
     call over the following steps, the running slots decoding in between, then is inserted;
  3. runs one decode call (P steps) for all slots;
  4. reads everything back at once (one device-to-host transfer per step) and hands each
     request its new tokens, first tokens first; a request that generated a stop id or spent
     its budget frees its slot at once.
`run_until_idle()` drives the steps in the calling thread (batch jobs: the same sequence of
programs on every process); `start()` runs them in a background thread (the server).

Per request: prompt ids, max_new_tokens, `Sampling`, seed (row key = key(seed), token s
sampled with fold_in(key, s): the same request gives the same tokens in any slot, next to any
neighbours), and optional callbacks `on_tokens(request, new_ids)` / `on_finish(request)`,
called on the scheduler's thread. Stop ids are shared (DESIGN.md §7); stop *strings* are the
caller's business (it detokenizes, and cancels the request when one appears).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import jax

from loopcoder_jax.generate import GenerationError, Sampling
from loopcoder_jax.serving.engine import SlotEngine, SlotRequest, eos_array

log = logging.getLogger(__name__)
_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. Outputs: `tokens` (new ids, ending with the stop id when one stopped it),
    `finish_reason` ("stop" | "length" | "cancelled" | "error"), `error` (message), `done`."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks, vLLM's extension)
    on_tokens: Callable[[Request, list[int]], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    # submitted / prefilled / first_token / finished (perf_counter)
    timings: dict = dataclasses.field(default_factory=dict)


class Scheduler:
    """Continuous batching over a `SlotEngine` (see the module docstring)."""

    def __init__(
        self,
        slots: SlotEngine,
        eos_ids: Sequence[int] | None = None,
        *,
        prefill_chunks: int = 4,
    ):
        self.slots = slots
        self.eos = eos_array(slots.engine, eos_ids)
        self.eos_set = {int(e) for e in self.eos}
        self.prefill_chunks = max(1, prefill_chunks)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._free = list(range(slots.slots))[::-1]  # pop() hands out slot 0 first
        self._prefilling = None  # a prompt longer than C: (request, cache1, offset, logits, slot)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failed: str | None = None  # set when a device program raised: nothing runs then
        self.stats = collections.Counter()

    # -------------------------------------------------------------- requests
    def validate(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        """Raises `GenerationError` (with the numbers) for a request that cannot run."""
        cfg = self.slots.cfg
        if not prompt:
            raise GenerationError("The prompt is empty; give at least one token.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}.")
        bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise GenerationError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})."
            )
        cap = self.slots.capacity()
        if len(prompt) + max_new_tokens > cap:
            raise GenerationError(
                f"The prompt ({len(prompt)} tokens) + max_tokens ({max_new_tokens}) exceeds the "
                f"context of {cap} tokens; use max_tokens <= {max(cap - len(prompt), 0)}"
                + (" or a shorter prompt." if len(prompt) >= cap else ".")
            )

    def submit(self, request: Request) -> Request:
        """Queues a request (validated first; raises `GenerationError`)."""
        self.validate(request.prompt, request.max_new_tokens)
        request.prompt = [int(t) for t in request.prompt]
        request.timings["submitted"] = time.perf_counter()
        with self._lock:
            if self.failed:
                raise GenerationError(f"The engine has stopped after an error: {self.failed}")
            self._pending.append(request)
            self._wake.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request (a disconnected client, a stop string): its slot frees next step."""
        with self._lock:
            request.cancelled = True
            self._wake.notify_all()

    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending or self._running or self._prefilling)

    def load(self) -> dict:
        with self._lock:
            return dict(
                pending=len(self._pending) + (self._prefilling is not None),
                running=len(self._running),
                slots=self.slots.slots,
            )

    # -------------------------------------------------------------- one step
    def step(self) -> bool:
        """One scheduling round; False when there was nothing to do."""
        worked = self._reap_cancelled()
        firsts = self._prefill()  # dispatched, not waited for
        out = self.slots.decode_async(self.eos) if self._running else None
        worked |= bool(firsts) or out is not None
        if not worked:
            return False
        first_host, out = jax.device_get(([f for _, f in firsts], out))  # the step's one sync
        for (slots, _), got in zip(firsts, first_host, strict=True):
            for slot, (tok, _done) in zip(slots, got, strict=False):  # rows past: padding
                self._emit(slot, [int(tok)])
        if out is not None:
            self.stats["decode_calls"] += 1
            for slot in list(self._running):
                new = [int(t) for t in out[slot] if t >= 0]
                if new:
                    self._emit(slot, new)
        return True

    def _reap_cancelled(self) -> bool:
        with self._lock:
            gone = [r for r in self._pending if r.cancelled]
            for r in gone:
                self._pending.remove(r)
            slots = [s for s, r in self._running.items() if r.cancelled]
            if self._prefilling is not None and self._prefilling[0].cancelled:
                gone.append(self._prefilling[0])
                self._free.append(self._prefilling[4])  # its slot was reserved, never used
                self._prefilling = None
        for s in slots:
            self.slots.release(s)
            gone.append(self._running.pop(s))
            self._free.append(s)
        for r in gone:
            self.stats["cancelled"] += 1
            self._finish(r, "cancelled")
        return bool(gone)

    def _prefill(self) -> list:
        """Dispatches this step's prefill work; returns [(slots, device first tokens)] of the
        requests inserted (their slots are running from now on)."""
        chunk = self.slots.chunk
        budget = self.prefill_chunks * chunk  # prompt tokens (padded) per step
        firsts = []
        short = []  # (request, slot) of prompts of at most C tokens, FIFO
        with self._lock:
            while self._free and self._pending and budget > 0:
                head = self._pending[0]
                if len(head.prompt) > chunk:
                    if self._prefilling is not None:
                        break  # one long prompt at a time; the queue keeps its order
                    self._pending.popleft()
                    self._prefilling = (head, None, 0, None, self._free.pop())
                    continue
                cost = self.slots.bucket(len(head.prompt))
                if short and cost > budget:
                    break
                self._pending.popleft()
                short.append((head, self._free.pop()))
                budget -= cost
        by_bucket: dict[int, list] = {}
        for request, slot in short:
            by_bucket.setdefault(self.slots.bucket(len(request.prompt)), []).append((request, slot))
        for group in by_bucket.values():
            while group:
                n = max(r for r in self.slots.row_buckets if r <= len(group))
                part, group = group[:n], group[n:]
                firsts.append(self._prefill_insert(part))
        if self._prefilling is not None:
            budget = max(budget, chunk)  # a long prompt advances by at least a chunk a step
            while budget > 0 and self._prefilling is not None:
                done = self._prefill_long()
                budget -= chunk
                if done is not None:
                    firsts.append(done)
        return firsts

    def _prefill_insert(self, part):
        rows = [
            SlotRequest(r.prompt, slot, r.seed, r.sampling, r.max_new_tokens, r.ignore_eos)
            for r, slot in part
        ]
        out = self.slots.prefill_insert_async(rows, self.eos)
        now = time.perf_counter()
        self.stats["prefill_calls"] += 1
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r, _ in part)
        longest = max(len(r.prompt) for r, _ in part)
        self.stats["prefill_positions"] += self.slots.prefill_rows(len(part)) * self.slots.bucket(
            longest
        )
        for request, slot in part:
            request.timings["prefilled"] = now
            self._running[slot] = request
        return [slot for _, slot in part], out

    def _prefill_long(self):
        """One chunk of the long prompt in progress; at its end, the insert (as `_prefill`)."""
        request, cache1, offset, logits, slot = self._prefilling
        if cache1 is None:
            cache1 = self.slots.new_prefill()
        part = request.prompt[offset : offset + self.slots.chunk]
        logits, cache1 = self.slots.prefill_chunk(cache1, part)
        offset += len(part)
        self.stats["prefill_calls"] += 1
        self.stats["prompt_tokens"] += len(part)
        self.stats["prefill_positions"] += self.slots.bucket(len(part))
        if offset < len(request.prompt):
            self._prefilling = (request, cache1, offset, logits, slot)
            return None
        self._prefilling = None
        out = self.slots.insert_async(
            cache1,
            logits,
            slot,
            seed=request.seed,
            sampling=request.sampling,
            max_new_tokens=request.max_new_tokens,
            eos_ids=self.eos,
            ignore_eos=request.ignore_eos,
        )
        request.timings["prefilled"] = time.perf_counter()
        self._running[slot] = request
        return [slot], out

    def _emit(self, slot: int, new: list[int]) -> None:
        request = self._running[slot]
        if not request.tokens:
            request.timings["first_token"] = time.perf_counter()
        request.tokens.extend(new)
        self.stats["new_tokens"] += len(new)
        if request.on_tokens is not None and not request.cancelled:
            try:
                request.on_tokens(request, new)
            except Exception:  # noqa: BLE001 - a broken consumer must not stop the others
                log.exception("on_tokens of request %d failed; cancelling it", request.id)
                request.cancelled = True
        reason = None
        if request.tokens[-1] in self.eos_set and not request.ignore_eos:
            reason = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            reason = "length"
        if reason is not None:  # the device has already made the slot inactive
            del self._running[slot]
            self._free.append(slot)
            self._finish(request, reason)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        request.finish_reason, request.error = reason, error
        request.timings["finished"] = time.perf_counter()
        if request.on_finish is not None:
            try:
                request.on_finish(request)
            except Exception:  # noqa: BLE001
                log.exception("on_finish of request %d failed", request.id)
        request.done.set()

    # -------------------------------------------------------------- drivers
    def run_until_idle(self) -> None:
        """Steps in this thread until no request is pending or running."""
        while self.busy():
            self.step()

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Runs a batch job to completion (every request validated before any work)."""
        for r in requests:
            self.validate(r.prompt, r.max_new_tokens)
        for r in requests:
            self.submit(r)
        self.run_until_idle()
        return list(requests)

    def start(self) -> None:
        """Runs the steps in a background thread until `stop()`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="loopcoder-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.busy():
                    self._wake.wait(timeout=1.0)
                if self._stopping and not self.busy():
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - fail every request rather than hang them
                log.exception("scheduler step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                return

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self.failed = message
            victims = list(self._pending) + list(self._running.values())
            if self._prefilling is not None:
                victims.append(self._prefilling[0])
            self._pending.clear()
            self._running.clear()
            self._prefilling = None
        for r in victims:
            self._finish(r, "error", message)

    def stop(self, timeout: float | None = None) -> None:
        """Lets the running and pending requests finish, then ends the thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
