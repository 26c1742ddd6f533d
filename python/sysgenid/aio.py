"""asyncio support: an :class:`AsyncWatcher` driven by the event loop, and
:func:`changes`, an async iterator of generation changes.

The watcher's descriptor is readable exactly while it is outdated, so
waiting for a change is ``loop.add_reader`` on it: no thread, no polling.
Requests (``ack``, ``wait_watchers``, ``trigger_update``, ``status``) are
round trips to a local daemon that may wait (a barrier waits for other
processes), so they run in the loop's default executor. Requests and reads
take turns on the socket, so a task may wait in :meth:`AsyncWatcher.read`
while another acknowledges or bumps. If the awaiting task is cancelled,
the request still completes in its thread and the next call waits for it
first, so replies are never mismatched.
"""

import asyncio

from . import _errors
from ._watcher import Watcher


class AsyncWatcher:
    """An async :class:`sysgenid.Watcher` (same arguments except
    ``nonblocking``). ``async with AsyncWatcher() as w:`` closes it."""

    def __init__(self, untracked=False, *, runtime_dir=None, reconnect=True, lifecycle=False):
        self._watcher = Watcher(
            nonblocking=True,
            untracked=untracked,
            runtime_dir=runtime_dir,
            reconnect=reconnect,
            lifecycle=lifecycle,
        )
        self._pending = None
        self._lock = None

    @property
    def watcher(self):
        """The underlying non-blocking watcher."""
        return self._watcher

    @property
    def acked(self):
        return self._watcher.acked

    def fileno(self):
        return self._watcher.fileno()

    async def read(self):
        """Waits until this watcher is outdated; returns the generation
        (again on every call until acknowledged). Cancel-safe, and safe to
        run alongside the other methods (they take turns on the socket)."""
        return await self._next(self._watcher.read)

    async def read_event(self):
        """The next lifecycle event (:class:`sysgenid.Event`), as
        :meth:`sysgenid.Watcher.read_event`; waits without blocking the
        loop. Cancel-safe."""
        return await self._next(self._watcher.read_event)

    async def confirm(self, freeze):
        """Confirms freeze number ``freeze``."""
        await self._call(self._watcher.confirm, freeze)

    async def _next(self, read):
        loop = asyncio.get_running_loop()
        while True:
            async with self._turn():
                await self._settle()
                try:
                    return read()
                except _errors.WouldBlock:
                    pass
                except (_errors.NotRunning, _errors.Disconnected):
                    # The daemon is restarting: the blocking reconnect loop
                    # runs off the event loop.
                    await self._in_thread(self._watcher._reconnect_with_backoff)
                    continue
            # Wait for readability without holding the turn, so a request
            # can run meanwhile (its reply also wakes us: we then wait for
            # the turn and look again).
            fd = self._watcher.fileno()
            ready = loop.create_future()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)

    async def ack(self, generation):
        """Acknowledges ``generation`` (:class:`sysgenid.WrongGeneration`
        if it is not current)."""
        await self._call(self._watcher.ack, generation)

    async def wait_watchers(self, timeout=None):
        """The barrier; see :meth:`sysgenid.Watcher.wait_watchers`."""
        await self._call(self._watcher.wait_watchers, timeout)

    async def trigger_update(self, min_generation=0):
        return await self._call(self._watcher.trigger_update, min_generation)

    async def status(self):
        return await self._call(self._watcher.status)

    def close(self):
        self._watcher.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        async with self._turn():
            await self._settle()
        self.close()

    def _turn(self):
        """The right to use the socket: one request or one look at a time.
        (Made here, inside the running loop, as Python 3.9 requires.)"""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _settle(self):
        """Waits for a request whose awaiting task was cancelled."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                await pending
            except Exception:
                pass

    async def _in_thread(self, fn, *args):
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(None, fn, *args)
        result = await asyncio.shield(self._pending)
        self._pending = None
        return result

    async def _call(self, fn, *args):
        async with self._turn():
            await self._settle()
            return await self._in_thread(fn, *args)


async def changes(*, untracked=False, runtime_dir=None):
    """Yields each new generation as it happens, acknowledging it when the
    loop body is done and the next one is asked for::

        async for generation in sysgenid.aio.changes():
            reseed()    # renew what must be unique; acked on the next turn

    If a newer generation superseded one while the body ran, the ack is
    refused by the daemon and the newer one is yielded next. Leaving the
    loop closes the watcher. For acknowledgement under your own control use
    :class:`AsyncWatcher`."""
    async with AsyncWatcher(untracked=untracked, runtime_dir=runtime_dir) as w:
        while True:
            generation = await w.read()
            yield generation
            try:
                await w.ack(generation)
            except _errors.WrongGeneration:
                pass
