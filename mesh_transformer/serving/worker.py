"""The server's generation worker: one thread drives an `Engine`, taking requests from a bounded queue, and
each request's rows report back to its handler through an asyncio queue on the server's loop.

A request whose row fails is answered with the error; the others go on. If the thread itself dies, it
records why, fails every request it holds, and refuses new ones at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import traceback
from typing import Any

from mesh_transformer.engine import Engine
from mesh_transformer.sampling import Completion, Row

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


class Job:
    """One HTTP request's rows and the way back to its handler. Events, in order: ("text", row, delta) as a
    row's text grows, ("done", row, Completion) once per row, or a single ("error", message)."""

    def __init__(self, rows: list[Row], loop: asyncio.AbstractEventLoop):
        self.rows, self.loop = rows, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the handler (client gone) or by a failed row: the others stop
        self._failed = False

    def send(self, *event: Any) -> None:
        if not self._failed:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def fail(self, message: str) -> None:
        if not self._failed:
            self.send("error", message)
            self._failed = self.cancelled = True


class _RowListener:
    """The engine's `Listener` for row `index` of a job."""

    def __init__(self, job: Job, index: int):
        self.job, self.index = job, index

    def on_text(self, delta: str) -> None:
        self.job.send("text", self.index, delta)

    def on_done(self, completion: Completion) -> None:
        self.job.send("done", self.index, completion)

    def on_error(self, error: Exception) -> None:
        self.job.fail(f"generation failed: {type(error).__name__}: {error}")

    def cancelled(self) -> bool:
        return self.job.cancelled


class Worker:
    """A daemon thread that feeds submitted jobs to `engine` and steps it while it has work."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._inbox: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self.error: str | None = None  # why the thread died, if it did
        self.queued = 0  # requests with a row not yet admitted to a slot
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when max_queue requests wait, EngineStopped when the thread died."""
        with self._wake:
            if not self.alive or self._closed:
                raise EngineStopped(self.error or "the server is shutting down")
            if self.queued >= self.max_queue:
                raise QueueFull()
            self._inbox.append(job)
            self.queued += 1
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug in the loop: say so rather than hang every client
            self.error = f"the generation engine stopped: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.error, traceback.format_exc())
            with self._wake:
                jobs = list(self._inbox)
                self._inbox.clear()
            for job in jobs:
                job.fail(self.error)
            for listener in self.engine.listeners():
                Engine.report(listener.on_error, RuntimeError(self.error))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.engine.busy and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                jobs = list(self._inbox)
                self._inbox.clear()
            for job in jobs:
                for index, row in enumerate(job.rows):
                    self.engine.add(row, _RowListener(job, index))
            self.engine.step()
            waiting = {id(listener.job) for listener in self.engine.waiting}
            with self._wake:
                self.queued = len(self._inbox) + len(waiting)
