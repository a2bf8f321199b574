"""Request batching for `prologue serve` and the Triton model (`triton.py`): one worker thread runs
every model call (or, for Triton, `Batcher.run` in the caller's thread); requests that arrive within
a short window and share their sampling settings share one AR loop. Torch-free and
web-free (numpy, the standard library and the runtime's `Generator`; the HTTP side is `app.py`).

Exactness: a request's images are those `Generator.generate` (or `variations`) gives it alone for
the same seed. Each request draws its noise from its own `PCG64(seed)` stream: a loop over the
rows of several requests feeds, at every AR position, the concatenation of each request's rows of
its own stream (`RowNoise`: `Noise` with `rows=(first, B)`, as `Generator.sample_tokens` draws a
chunk), through `Generator.generation` (the call `sample_tokens` makes for each chunk), and every
request's images are decoded on their own (`Generator.images_of`, in the chunks `decode` uses). Only requests with equal settings and the same kind (sampled or fixed prologue) are merged:
the CFG scale, temperature, top-k and top-p are per-call scalars of the `ar_step` graph, and a
fixed prologue is prefilled. What a row's tokens depend on besides its noise is its own KV cache
and logits; tests/test_serve.py checks that ONNX Runtime CPU gives bit-identical tokens and PNGs
for every batch composition it sees.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import threading
import time
import typing

import numpy as np

from ..runtime.loop import InputError, Noise
from ..runtime.settings import SamplingConfig


class QueueFull(InputError):
    """The server's queue is full; `retry_after` is a guess in seconds of when it has room."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ServerClosed(InputError):
    """The server is shutting down and takes no new work."""


def settings_key(settings: SamplingConfig) -> tuple:
    """What must be equal for two requests to share one AR loop (every field of the settings)."""
    return tuple(sorted(vars(settings).items()))


@dataclasses.dataclass(eq=False)
class Job:
    """One request: AR rows to sample (`classes`, `seed`, `settings`, optionally fixed prologue
    ids or an image whose prologue is fixed), or a plain `call(generator)` run in turn (reconstruct).
    `future` receives a `JobResult` (or the exception)."""

    classes: typing.Optional[np.ndarray] = None  # [B] int64
    seed: int = 0
    settings: typing.Optional[SamplingConfig] = None
    prologue_ids: typing.Optional[np.ndarray] = None  # [B, Z] raw codes, or None
    image: typing.Optional[np.ndarray] = None  # uint8 [H, W, C]: encode it first, its prologue fixed for all rows
    call: typing.Optional[typing.Callable] = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)
    started: typing.Optional[float] = None
    cancelled: bool = False
    next_row: int = 0  # rows handed to a loop so far
    rows_done: int = 0
    tokens: typing.Optional[np.ndarray] = None  # [B, T]
    shared_rows: int = 0  # the largest loop (in images) this job's rows ran in

    @property
    def rows(self) -> int:
        return 0 if self.classes is None else len(self.classes)

    @property
    def fixed(self) -> bool:
        return self.prologue_ids is not None or self.image is not None

    @property
    def key(self) -> tuple:
        return (settings_key(self.settings), self.fixed)


@dataclasses.dataclass
class JobResult:
    images: typing.Optional[np.ndarray]  # uint8 [B, H, W, C]
    tokens: typing.Optional[np.ndarray]  # [B, T] AR sequences (None for a call)
    value: typing.Any = None  # a call's return value
    queued_s: float = 0.0  # enqueue -> its first model call
    run_s: float = 0.0  # its first model call -> done
    shared_rows: int = 0  # the most images one of its AR loops held (its own and other requests')


class RowNoise:
    """The noise of one loop over segments of several requests: at each position, each segment's
    rows of its own request's stream, concatenated in row order. Quacks like `Noise` for `TokenLoop`."""

    def __init__(self, parts: typing.Sequence[Noise]):
        self.parts = list(parts)

    def at(self, step: int) -> np.ndarray:
        blocks = [part.at(step) for part in self.parts]
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class Batcher:
    """The one thread that runs the model. `submit(job)` queues a job (at most `max_queue` waiting:
    `QueueFull` beyond) and returns its future; `cancel(job)` drops a queued job, or stops its
    rows from being scheduled further (a loop whose requests are all cancelled stops at the next
    step); `close()` finishes everything queued and running, then stops the thread.

    `window_s`: when the worker is idle and a job arrives, it waits this long for more to join
    (less when a batch is already full). `batching=False`: one request per loop, no window."""

    def __init__(self, generator, window_s: float = 0.01, batching: bool = True, max_queue: int = 64,
                 start: bool = True):
        self.generator = generator
        self.window_s = max(0.0, float(window_s))
        self.batching = bool(batching)
        self.max_queue = int(max_queue)
        self.max_rows = max(1, int(generator.max_batch))
        self.pending: typing.Deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.busy = False
        self.loop_seconds = 0.0  # running mean of one loop's time, for Retry-After
        self.loops = 0
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self._work, name="prologue-serve-worker", daemon=True)
            self.thread.start()

    def run(self, jobs: typing.Sequence[Job]) -> typing.List[concurrent.futures.Future]:
        """Run `jobs` to the end in the caller's thread, merged into AR loops exactly as the worker
        merges a queue (same key, up to `max_batch` rows a loop): a Batcher made with `start=False`
        (Triton's `execute`, which hands over the requests its own dynamic batcher gathered). Returns
        their futures, all done (a result or the job's exception)."""
        if self.thread is not None:
            raise RuntimeError("Batcher.run is for a batcher without a worker thread (start=False)")
        with self.cond:
            for job in jobs:
                job.enqueued = time.perf_counter()
                self.pending.append(job)
        while self.pending:
            head = self.pending[0]
            progress = head.next_row
            self._run_head(head)
            if self.pending and self.pending[0] is head and head.next_row == progress:  # cannot happen; never spin
                self._fail([head], RuntimeError("the batcher made no progress on a request"))
        return [job.future for job in jobs]

    # -- the request side (any thread) ---------------------------------------------------------

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self.cond:
            if self.closing:
                raise ServerClosed("the server is shutting down")
            if self._waiting() >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later",
                                self.retry_after())
            job.enqueued = time.perf_counter()
            self.pending.append(job)
            self.cond.notify_all()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        rows = sum(max(j.rows, 1) - j.next_row for j in self.pending)
        return max(1, math.ceil(self.loop_seconds * (rows / self.max_rows + 1)))

    def cancel(self, job: Job) -> None:
        with self.cond:
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)
        job.future.cancel()  # a no-op once running or done

    def _waiting(self) -> int:
        """Requests none of whose rows has reached a loop yet (a running request does not count; a
        variations request whose image is already encoded, waiting for a loop, does)."""
        return sum(1 for j in self.pending if j.next_row == 0)

    def queued(self) -> int:
        with self.cond:
            return self._waiting()

    def close(self, timeout: typing.Optional[float] = None) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                if not self.pending:
                    return
                if self.batching:
                    self._wait_window()
                if not self.pending:  # every waiting client went away during the window
                    continue
                head = self.pending[0]
                self.busy = True
            try:
                self._run_head(head)
            finally:
                with self.cond:
                    self.busy = False

    def _run_head(self, head: Job) -> None:
        """One model call or one AR loop, starting with `head` (the oldest job)."""
        try:
            if head.call is not None:
                self._run_call(head)
            else:
                self._run_loop(head)
        except BaseException as exc:  # a bug: answer the requests rather than leave their clients hanging
            with self.cond:
                partly = [j for j in self.pending if j.next_row > 0]
            self._fail([head, *partly], exc)

    def _wait_window(self) -> None:
        """Hold (the lock released) until the oldest job has waited `window_s`, or a batch is full.
        Jobs that queued while a loop ran have usually waited longer already: they go at once."""
        deadline = self.pending[0].enqueued + self.window_s
        while self.pending and not self.closing:
            left = deadline - time.perf_counter()
            head = self.pending[0]
            if left <= 0 or head.call is not None:
                return
            rows = sum(j.rows - j.next_row for j in self.pending if j.call is None and j.key == head.key)
            if rows >= self.max_rows:
                return
            self.cond.wait(left)

    def _run_call(self, job: Job) -> None:
        with self.cond:
            if self.pending and self.pending[0] is job:
                self.pending.popleft()
        if job.cancelled or not job.future.set_running_or_notify_cancel():
            return
        job.started = time.perf_counter()
        try:
            value = job.call(self.generator)
        except BaseException as exc:
            job.future.set_exception(exc)
            return
        done = time.perf_counter()
        job.future.set_result(JobResult(None, None, value, job.started - job.enqueued, done - job.started))

    def _take(self, head: Job) -> typing.List[typing.Tuple[Job, int, int]]:
        """Segments (job, first row, rows) for the next loop: the head job's next rows, then (with
        batching) the next rows of later jobs with the same key, up to `max_rows` images."""
        segments, room = [], self.max_rows
        with self.cond:
            candidates = list(self.pending) if self.batching else [head]
            for job in candidates:
                if room == 0:
                    break
                if job.call is not None or job.key != head.key or job.cancelled:
                    continue
                if job.fixed and job.prologue_ids is None:  # its image failed to encode, or waits for it
                    continue
                if not job.future.running() and not job.future.set_running_or_notify_cancel():
                    self.pending.remove(job)
                    continue
                count = min(room, job.rows - job.next_row)
                segments.append((job, job.next_row, count))
                job.next_row += count
                room -= count
                if job.next_row == job.rows:
                    self.pending.remove(job)
        return segments

    def _prepare(self, head: Job) -> None:
        """Encode the image of each queued variations job that shares the head's key (its prologue,
        fixed for all its rows, as `Generator.variations` encodes it); a job that fails is answered."""
        with self.cond:
            jobs = [j for j in (self.pending if self.batching else [head])
                    if j.image is not None and j.prologue_ids is None and j.call is None and j.key == head.key]
        for job in jobs:
            if not job.future.running() and not job.future.set_running_or_notify_cancel():
                self.cancel(job)
                continue
            job.started = job.started or time.perf_counter()
            try:
                prologue, _ = self.generator.encode(job.image[None])
            except BaseException as exc:
                self._fail([job], exc)
                continue
            job.prologue_ids = np.repeat(prologue, job.rows, axis=0)

    def _fail(self, jobs, exc: BaseException) -> None:
        with self.cond:
            for job in jobs:
                if job in self.pending:
                    self.pending.remove(job)
        for job in jobs:
            if not job.future.done():
                if job.future.running() or job.future.set_running_or_notify_cancel():
                    job.future.set_exception(exc)

    def _run_loop(self, head: Job) -> None:
        self._prepare(head)
        segments = self._take(head)
        if not segments:
            return
        jobs = [job for job, _, _ in segments]
        now = time.perf_counter()
        try:  # every job holding rows of this loop is answered, whatever fails
            for job in jobs:
                if job.started is None:
                    job.started = now
                if job.tokens is None:
                    job.tokens = np.zeros((job.rows, self.generator.bundle.vocab.seq_len), dtype=np.int64)
                job.shared_rows = max(job.shared_rows, sum(count for _, _, count in segments))
            tokens = self._sample(segments)
        except BaseException as exc:
            self._fail(jobs, exc)
            return
        self._note_loop(time.perf_counter() - now)
        if tokens is None:  # every request in it was cancelled
            return
        offset = 0
        for job, first, count in segments:
            job.tokens[first:first + count] = tokens[offset:offset + count]
            offset += count
            job.rows_done += count
            if job.rows_done == job.rows and not job.cancelled:
                self._finish(job)

    def _note_loop(self, seconds: float) -> None:
        self.loops += 1
        self.loop_seconds += (seconds - self.loop_seconds) / min(self.loops, 20)

    def _sample(self, segments) -> typing.Optional[np.ndarray]:
        """One AR loop over the segments' rows; None when all their requests were cancelled meanwhile."""
        gen = self.generator
        vocab, settings = gen.bundle.vocab, segments[0][0].settings
        T, V = vocab.seq_len, vocab.vocab_size
        classes = np.concatenate([job.classes[first:first + count] for job, first, count in segments])
        fixed = None
        if segments[0][0].fixed:
            fixed = np.concatenate([job.prologue_ids[first:first + count] for job, first, count in segments])
        noise = RowNoise([Noise(count, T, V, seed=job.seed, rows=(first, job.rows)) for job, first, count in segments])
        with gen.generation(classes, noise, settings, prologue_ids=fixed) as run:
            while not run.done:
                if all(job.cancelled for job, _, _ in segments):
                    return None
                run.step()
            return run.tokens

    def _finish(self, job: Job) -> None:
        try:
            images = self.generator.images_of(job.tokens)
        except BaseException as exc:
            self._fail([job], exc)
            return
        done = time.perf_counter()
        job.future.set_result(JobResult(images, job.tokens, None, job.started - job.enqueued, done - job.started,
                                        job.shared_rows))
