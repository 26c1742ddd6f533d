"""The watcher and the control connection: the blocking API, with the Rust
client's exact behaviour (``crates/sysgenid/src/lib.rs``)."""

import os
import select
import time

from . import _conn, _errors, _protocol, _trust
from ._conn import WOULD_BLOCK, Connection, expect_done, expect_status, expect_welcome

_U32_MAX = 0xFFFFFFFF


def _timeout_ms(timeout):
    """Seconds (``None`` = forever) as the protocol's milliseconds (0 =
    forever; anything shorter than 1 ms waits 1 ms)."""
    if timeout is None:
        return 0
    if timeout < 0:
        raise ValueError("timeout must be >= 0 seconds or None, got %r" % (timeout,))
    return min(max(int(timeout * 1000), 1), _U32_MAX)


def _u32(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32_MAX:
        raise ValueError("%s must be an integer in 0..=%d, got %r" % (name, _U32_MAX, value))
    return value


def _socket_path(runtime_dir):
    return os.path.join(
        os.fspath(runtime_dir) if runtime_dir else _trust.default_runtime_dir(),
        _protocol.SOCKET_NAME,
    )


class Watcher:
    """One watcher of the system generation, as one open handle of the
    seed's ``/dev/sysgenid``.

    * :meth:`read` blocks until this watcher is outdated and returns the
      current generation, again on every call until acknowledged;
      non-blocking watchers raise :class:`BlockingIOError`
      (:class:`sysgenid.WouldBlock`, ``EAGAIN``) when nothing is new.
    * :meth:`ack` confirms a generation (``OSError`` with ``errno.EINVAL``,
      :class:`sysgenid.WrongGeneration`, for any other value; nothing
      changes).
    * :meth:`fileno` is readable exactly while the watcher is outdated, for
      ``select``, ``selectors`` and ``asyncio``. It changes when the watcher
      reconnects: re-register it if :meth:`read` reconnected.
    * :meth:`wait_watchers` is the seed's barrier.
    * Untracked watchers never hold up :meth:`wait_watchers`.
    * With ``reconnect`` (the default) a watcher survives daemon restarts:
      it reconnects with backoff (10 ms doubling to 1 s), telling the daemon
      the generation it last acknowledged, so a change missed while away is
      still delivered.

    Use it from one thread at a time. ``with Watcher() as w:`` closes it,
    which unregisters the watcher.
    """

    def __init__(self, nonblocking=False, untracked=False, *, runtime_dir=None, reconnect=True):
        self._socket = _socket_path(runtime_dir)
        self._nonblocking = bool(nonblocking)
        self._untracked = bool(untracked)
        self._reconnect = bool(reconnect)
        self._conn = Connection.connect(self._socket, _protocol.hello_watcher(self._untracked))
        try:
            self._acked = expect_welcome(self._conn)
        except BaseException:
            self._conn.close()
            raise

    @property
    def acked(self):
        """The generation this watcher last acknowledged, or registered at."""
        return self._acked

    @property
    def nonblocking(self):
        return self._nonblocking

    @property
    def untracked(self):
        return self._untracked

    def fileno(self):
        """Readable exactly while the watcher is outdated."""
        return self._conn.fileno()

    def read(self):
        """Blocks until this watcher is outdated and returns the current
        generation; returns it again until acknowledged. Non-blocking:
        :class:`sysgenid.WouldBlock` (a ``BlockingIOError``) when nothing is
        new. Survives daemon restarts when reconnecting is on."""
        while True:
            try:
                generation = self._conn.try_changed()
            except _errors.Disconnected:
                if not self._reconnect:
                    raise
                if self._nonblocking:
                    self._reconnect_once()
                else:
                    self._reconnect_with_backoff()
                continue
            if generation is not WOULD_BLOCK:
                return generation
            if self._nonblocking:
                raise _errors.WouldBlock()
            _conn.wait_fd(self._conn.fileno(), select.POLLIN)

    def try_read(self):
        """Like :meth:`read` but never blocks: ``None`` when there is nothing
        new. If the daemon went away it tries to reconnect once, without
        waiting, and otherwise raises :class:`sysgenid.Disconnected` or
        :class:`sysgenid.NotRunning`."""
        try:
            generation = self._conn.try_changed()
        except _errors.Disconnected:
            if not self._reconnect:
                raise
            self._reconnect_once()
            generation = self._conn.try_changed()
        return None if generation is WOULD_BLOCK else generation

    def wait_readable(self, timeout):
        """Waits up to ``timeout`` seconds for the watcher to become
        outdated; True if it is."""
        return _conn.wait_fd(self._conn.fileno(), select.POLLIN, timeout)

    def ack(self, generation):
        """Acknowledges ``generation``, which must be the current one."""
        generation = _u32("generation", generation)
        self._request(_protocol.ack(generation), is_ack=True)
        self._acked = generation

    def wait_watchers(self, timeout=None):
        """The seed's ``SYSGENID_WAIT_WATCHERS``: returns when no tracked
        watcher is outdated; raises :class:`sysgenid.Interrupted` (an
        ``InterruptedError``, ``EINTR``) if this watcher is or becomes
        outdated (handle, ack, retry), :class:`sysgenid.TimedOut` (a
        ``TimeoutError``) after ``timeout`` seconds (``None`` = forever)."""
        self._request(_protocol.wait_watchers(_timeout_ms(timeout)))

    def trigger_update(self, min_generation=0):
        """The seed's ``SYSGENID_FORCE_GEN_UPDATE`` (privileged): returns the
        new generation, ``max(min_generation, current + 1)``."""
        return self._request(_protocol.bump(_u32("min_generation", min_generation)))

    def status(self):
        """The daemon's status (a dict; see :func:`sysgenid.status`)."""
        self._conn.send(_protocol.status())
        return expect_status(self._watcher_reply(False))

    def close(self):
        """Closes the connection, which unregisters the watcher
        (idempotent)."""
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "Watcher(%r, acked=%d, untracked=%s, nonblocking=%s)" % (
            self._socket,
            self._acked,
            self._untracked,
            self._nonblocking,
        )

    def _watcher_reply(self, is_ack):
        """The reply to the request just sent, keeping the readiness
        invariant visible to the caller: if the frames consumed show this
        watcher is still outdated, the daemon's trailing ``Changed`` is
        awaited."""
        reply, newest = self._conn.reply_noting_changes()
        if newest is not None:
            # Only a successful Ack of the newest generation makes the
            # watcher up to date (a Bump's Done names the new generation
            # while the watcher is outdated).
            acked_now = is_ack and isinstance(reply, _protocol.Done) and reply.generation == newest
            still_outdated = not acked_now and newest != self._acked
            if still_outdated and self._conn.try_peek() is WOULD_BLOCK:
                self._conn.await_trailing_changed()
        return reply

    def _request(self, frame, is_ack=False):
        try:
            self._conn.send(frame)
            return expect_done(self._watcher_reply(is_ack))
        except _errors.Disconnected:
            if not self._reconnect:
                raise
        self._reconnect_with_backoff()
        self._conn.send(frame)
        return expect_done(self._watcher_reply(is_ack))

    def _reconnect_with_backoff(self):
        delay = 0.01
        while True:
            try:
                self._reconnect_once()
                return
            except (_errors.NotRunning, _errors.Disconnected):
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _reconnect_once(self):
        conn = Connection.connect(
            self._socket, _protocol.hello_watcher(self._untracked, self._acked)
        )
        try:
            expect_welcome(conn)
        except BaseException:
            conn.close()
            raise
        self._conn.close()
        self._conn = conn


class Control:
    """A connection for status, forced updates and barrier waits, without
    being a watcher. ``with Control() as c:`` closes it."""

    def __init__(self, runtime_dir=None):
        self._conn = Connection.connect(_socket_path(runtime_dir), _protocol.hello_control())
        try:
            self.generation_at_connect = expect_welcome(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def status(self):
        """The daemon's status (a dict)."""
        self._conn.send(_protocol.status())
        return expect_status(self._conn.reply())

    def trigger_update(self, min_generation=0):
        """Forced update (privileged): the new generation."""
        self._conn.send(_protocol.bump(_u32("min_generation", min_generation)))
        return expect_done(self._conn.reply())

    def wait_watchers(self, timeout=None):
        """Waits until no tracked watcher is outdated (never interrupted:
        this connection is not a watcher); ``TimeoutError`` after
        ``timeout`` seconds (``None`` = forever)."""
        self._conn.send(_protocol.wait_watchers(_timeout_ms(timeout)))
        expect_done(self._conn.reply())

    def close(self):
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def trigger_update(min_generation=0, *, runtime_dir=None):
    """A forced update (the seed's ``SYSGENID_FORCE_GEN_UPDATE``): returns
    the new generation, ``max(min_generation, current + 1)``. Needs
    CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (or the daemon's own uid for a
    per-user daemon): :class:`sysgenid.PermissionDenied`, a
    ``PermissionError``, otherwise. :class:`sysgenid.Overflow` when it
    would pass 2**32 - 1. Nothing changes on an error."""
    with Control(runtime_dir) as c:
        return c.trigger_update(min_generation)


def status(*, runtime_dir=None):
    """The daemon's status as a dict with the keys of ``docs/protocol.md``
    (``generation``, ``epoch``, ``watchers``, ``tracked``, ``outdated``,
    ``outdated_untracked``, ``uptime_ms``, ``last_change_unix_ms``,
    ``last_change_sources``, ``sources``, ``runtime_dir``, ``device``,
    ``daemon_version``). Counts are advisory: stale once read."""
    with Control(runtime_dir) as c:
        return c.status()


def wait_watchers(timeout=None, *, runtime_dir=None):
    """Waits until every tracked watcher acknowledged the current
    generation (:class:`sysgenid.TimedOut` after ``timeout`` seconds)."""
    with Control(runtime_dir) as c:
        c.wait_watchers(timeout)
