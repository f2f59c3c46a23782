"""Whether a runner process on this host is alive, told by the kernel rather than a heartbeat.

Each runner holds an exclusive ``flock`` on a file of its own for its whole
life. The kernel frees the lock when the process dies, however it dies, so
"can I take that runner's lock?" answers "is it dead?" at once. A process that
is merely stopped (SIGSTOP) keeps its lock. The SQLite coordinator keeps the
files next to its database; the Redis coordinator in ``host_folder()``, where
only runners of this host and user see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

# A lock file younger than this is never removed as stale: its runner may have
# created it and not yet locked it.
STALE_LOCK_AGE = 60.0
# How often a death is checked where pidfd is not available.
POLL = 0.1
# How long ``died_here`` keeps an answer: a batch of thousands of refusals names a few
# owners, each looked up on disk once.
RECALL = 0.05


def boot_id() -> str:
    """An id of this boot of the host: monotonic times are comparable only within one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        # Elsewhere the boot time, to the second, tells boots apart.
        return str(round(time.time() - time.monotonic()))


def host_folder() -> Path:
    """The folder for the liveness locks of this user's runners on this host."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
    return base / f"ostinato-runners-{os.getuid()}"


class RunnerLocks:
    """The liveness locks of the runners sharing one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._held: dict[str, int] = {}
        # By runner id: the last ``died_here`` answer and when it was found (monotonic).
        self._recalled: dict[str, tuple[bool | None, float]] = {}

    def _path(self, runner_id: str) -> Path:
        return self.folder / f"{runner_id}.lock"

    def hold(self, runner_id: str) -> None:
        """Take ``runner_id``'s lock for the life of this process; call before its first grant."""
        if runner_id in self._held:
            return
        self.folder.mkdir(mode=0o700, exist_ok=True)
        path = self._path(runner_id)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A stale-file sweep may have unlinked the file between open and lock.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._held[runner_id] = fd
        self._sweep()

    def _sweep(self) -> None:
        now = time.time()
        for path in self.folder.glob("*.lock"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_LOCK_AGE and _is_free(path):
                    path.unlink()

    def dead(self, runner_id: str) -> bool:
        """Whether ``runner_id``'s process has ended (its lock is free)."""
        if runner_id in self._held:
            return False
        return _is_free(self._path(runner_id))

    def died_here(self, runner_id: str) -> bool | None:
        """Whether ``runner_id`` was a process of this host that has ended: ``None`` when
        this folder does not know it (another host or user, or long gone)."""
        if runner_id in self._held:
            return False
        now = time.monotonic()
        recalled = self._recalled.get(runner_id)
        if recalled is not None and (recalled[0] or now - recalled[1] < RECALL):
            return recalled[0]  # a death is for good; the rest is kept a moment
        path = self._path(runner_id)
        died = _is_free(path) if path.exists() else None
        if len(self._recalled) > 1000:
            self._recalled.clear()
        self._recalled[runner_id] = (died, now)
        return died

    def release_all(self) -> None:
        for runner_id, fd in self._held.items():
            with contextlib.suppress(OSError):
                self._path(runner_id).unlink()
            os.close(fd)
        self._held.clear()

    async def wait_for_death(self, runner_id: str, pid: int) -> None:
        """Return once ``runner_id`` (process ``pid``) has died: woken by its pidfd, no polling."""
        loop = asyncio.get_running_loop()
        pidfd = _pidfd_open(pid)
        try:
            if pidfd is not None:
                exited = loop.create_future()
                loop.add_reader(pidfd, _settle, exited)
                try:
                    await exited
                finally:
                    loop.remove_reader(pidfd)
            # The kernel frees the lock before the pidfd turns readable; the lock is
            # still what decides, in case the pid belonged to another process.
            while not self.dead(runner_id):  # noqa: ASYNC110 - a flock has no event to await
                await asyncio.sleep(POLL)
            self._recalled[runner_id] = (True, time.monotonic())
        finally:
            if pidfd is not None:
                os.close(pidfd)


def _is_free(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the descriptor also drops a lock just taken
    return True


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _pidfd_open(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    return fd
