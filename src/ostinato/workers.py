"""Threads for sync passes: started when every thread is busy, ended after a while idle.

A sync loop runs its passes in a thread while it has work, and gives the thread back
when its next pass is more than a quarter second off (see ``LoopKeeper``), so ten thousand idle sync loops
hold a handful of threads, not ten thousand. A job never waits for a thread to free up
for long: up to ``SOFT_CAP`` threads are started at once as needed; past that, a job
waits in a queue for the next thread to free up, and while jobs wait, new threads are
still started, ``SPAWN_BURST`` every ``SPAWN_EVERY`` seconds, so a loop whose passes
never end (it holds its thread for good) delays the others by milliseconds, while a
burst of thousands of short passes (every loop's first pass at start) does not start
thousands of threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

#: A thread with no work for this long ends.
IDLE_EXIT = 10.0
#: Threads started at once, as needed, before jobs wait in the queue.
SOFT_CAP = 64
#: While jobs wait: how many threads are started, and how often.
SPAWN_BURST = 8
SPAWN_EVERY = 0.02

Job = Callable[[], None]


class Workers:
    """An elastic set of daemon threads running whatever they are given, one job each."""

    def __init__(
        self, name: str = "ostinato-pass", *, idle_exit: float = IDLE_EXIT,
        soft_cap: int = SOFT_CAP, spawn_burst: int = SPAWN_BURST, spawn_every: float = SPAWN_EVERY,
    ) -> None:
        self.name = name
        self.idle_exit = idle_exit
        self.soft_cap = soft_cap
        self.spawn_burst = spawn_burst
        self.spawn_every = spawn_every
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._queue: deque[Job] = deque()
        self._spawning = False
        self._count = 0
        #: Threads started so far, for tests and diagnostics.
        self.started = 0

    @property
    def threads(self) -> int:
        """Threads alive now (busy or idle)."""
        return self._count

    def run(self, job: Job) -> None:
        """Run ``job`` in a free thread, a new one, or the first to free up."""
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
            elif self._count < self.soft_cap:
                worker = self._new()
            else:
                self._queue.append(job)
                if not self._spawning:
                    self._spawning = True
                    threading.Thread(target=self._spawn, name=f"{self.name}-spawner", daemon=True).start()
                return
        worker.give(job)

    def _new(self) -> _Worker:
        self._count += 1
        self.started += 1
        return _Worker(self, f"{self.name}-{self.started}")

    def _spawn(self) -> None:
        """While jobs wait, start a few threads for them every ``spawn_every`` seconds."""
        while True:
            time.sleep(self.spawn_every)
            given = []
            with self._lock:
                for _ in range(self.spawn_burst):
                    if not self._queue:
                        break
                    given.append((self._idle.pop() if self._idle else self._new(), self._queue.popleft()))
                if not self._queue and not given:
                    self._spawning = False
                    return
            for worker, job in given:
                worker.give(job)

    def _next(self, worker: _Worker) -> Job | None:
        """A waiting job for ``worker``, which just finished one; else it rests."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            self._idle.append(worker)
            return None

    def _retire(self, worker: _Worker) -> bool:
        """Whether an idle ``worker`` may end (nobody gave it a job meanwhile)."""
        with self._lock:
            if worker not in self._idle:
                return False
            self._idle.remove(worker)
            self._count -= 1
            return True


class _Worker:
    def __init__(self, pool: Workers, name: str) -> None:
        self.pool = pool
        self._job: Job | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._started = False

    def give(self, job: Job) -> None:
        self._job = job
        self._ready.set()
        if not self._started:
            self._started = True
            self._thread.start()

    def _serve(self) -> None:
        while True:
            if not self._ready.wait(self.pool.idle_exit):
                if self.pool._retire(self):
                    return
                self._ready.wait()  # given a job just as it was about to end
            self._ready.clear()
            job, self._job = self._job, None
            while job is not None:
                job()  # the job reports its own outcome; it never raises here
                job = self.pool._next(self)


#: The threads every runner of the process shares.
WORKERS = Workers()
