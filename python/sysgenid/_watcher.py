"""The watcher and the control connection: the blocking API, with the Rust
client's exact behaviour (``crates/sysgenid/src/lib.rs``)."""

import collections
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

    * With ``lifecycle=True`` the watcher is also a snapshot-lifecycle
      participant (protocol 2): :meth:`read_event` tells it to freeze, thaw
      or renew, and it must :meth:`confirm` each freeze (a tracked
      participant holds a freeze up until it does).

    Use it from one thread at a time. ``with Watcher() as w:`` closes it,
    which unregisters the watcher.
    """

    def __init__(
        self,
        nonblocking=False,
        untracked=False,
        *,
        runtime_dir=None,
        reconnect=True,
        lifecycle=False,
    ):
        self._socket = _socket_path(runtime_dir)
        self._nonblocking = bool(nonblocking)
        self._untracked = bool(untracked)
        self._reconnect = bool(reconnect)
        self._lifecycle = bool(lifecycle)
        # Lifecycle events read while waiting for a reply, oldest first.
        self._events = collections.deque()
        # A generation the caller chose not to acknowledge yet (skip()).
        self._skipped = None
        # Counts reconnections: freeze numbers belong to one daemon run.
        self._conn_no = 0
        # The freeze this participant was last told of and not yet thawed
        # from, and the latest one told of (kept after the thaw), each with
        # the connection it came on.
        self._frozen = None
        self._last_freeze = None
        self._conn = Connection.connect(self._socket, self._hello(None))
        try:
            self._acked = expect_welcome(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def _hello(self, acked):
        return _protocol.hello_watcher(self._untracked, acked, self._lifecycle)

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

    @property
    def lifecycle(self):
        return self._lifecycle

    def fileno(self):
        """Readable exactly while the watcher is outdated."""
        return self._conn.fileno()

    def read(self):
        """Blocks until this watcher is outdated and returns the current
        generation; returns it again until acknowledged. Non-blocking:
        :class:`sysgenid.WouldBlock` (a ``BlockingIOError``) when nothing is
        new. Survives daemon restarts when reconnecting is on.

        On a lifecycle participant use :meth:`read_event`: ``read`` returns
        changes only and drops freeze and thaw events (their freezes then
        go unconfirmed)."""
        if self._lifecycle:
            while True:
                event = self.read_event()
                if event.kind == "change":
                    return event.generation
        return self._blocking(lambda: self._conn.try_changed())

    def try_read(self):
        """Like :meth:`read` but never blocks: ``None`` when there is nothing
        new. If the daemon went away it tries to reconnect once, without
        waiting, and otherwise raises :class:`sysgenid.Disconnected` or
        :class:`sysgenid.NotRunning`."""
        if self._lifecycle:
            while True:
                event = self.try_read_event()
                if event is None:
                    return None
                if event.kind == "change":
                    return event.generation
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
        self._skipped = None

    def read_event(self):
        """Blocks for the next lifecycle event (:class:`sysgenid.Event`;
        non-blocking: :class:`sysgenid.WouldBlock` when there is none).
        Freeze and thaw events are returned once each, in order; a change is
        returned on every call until acknowledged (or :meth:`skip`\ ped).
        On a watcher opened without ``lifecycle`` only changes arrive.

        Events that arrive while a request waits for its reply are kept and
        returned first; after a request, read until :meth:`try_read_event`
        gives ``None`` before polling the descriptor again."""
        def next_event():
            if self._events:
                return self._events.popleft()
            return self._conn.try_event(self._skipped)

        return self._noted(self._blocking(next_event))

    def _blocking(self, attempt):
        """What ``attempt()`` gives once it is not ``WOULD_BLOCK``: between
        attempts, waits for the socket (non-blocking:
        :class:`sysgenid.WouldBlock`), and reconnects when the daemon went
        away (if reconnecting is on; non-blocking: one try, no waiting)."""
        while True:
            try:
                value = attempt()
            except _errors.Disconnected:
                if not self._reconnect:
                    raise
                if self._nonblocking:
                    self._reconnect_once()
                else:
                    self._reconnect_with_backoff()
                continue
            if value is not WOULD_BLOCK:
                return value
            if self._nonblocking:
                raise _errors.WouldBlock()
            _conn.wait_fd(self._conn.fileno(), select.POLLIN)

    def try_read_event(self):
        """Like :meth:`read_event` but never blocks: ``None`` when there is
        nothing."""
        if self._events:
            return self._noted(self._events.popleft())
        try:
            event = self._conn.try_event(self._skipped)
        except _errors.Disconnected:
            if not self._reconnect:
                raise
            self._reconnect_once()
            if self._events:
                event = self._events.popleft()
            else:
                event = self._conn.try_event(self._skipped)
        return None if event is WOULD_BLOCK else self._noted(event)

    def _noted(self, event):
        """Remembers what a participant was told, for reconnections."""
        if event.kind == "freeze":
            self._frozen = self._last_freeze = (event.freeze, self._conn_no)
        elif event.kind == "thaw":
            self._frozen = None
        return event

    def confirm(self, freeze):
        """Confirms that this participant has quiesced for freeze number
        ``freeze``. Confirming a freeze that already ended succeeds and
        changes nothing (its thaw is on the way); one never asked for is
        refused (:class:`sysgenid.Refused`, ``EINVAL``). On a watcher opened
        without ``lifecycle`` it is refused here (``ENOTCONN``, the
        protocol's NotAParticipant) and nothing is sent: such a watcher
        speaks protocol 1, where the request does not exist.

        A freeze read before the daemon restarted is gone with that daemon:
        confirming it afterwards succeeds and sends nothing (its thaw is
        reported by the reconnection)."""
        freeze = _u32("freeze", freeze)
        if not self._lifecycle:
            raise _errors.Refused(
                _errors.NOT_A_PARTICIPANT,
                "confirm needs a lifecycle participant: open the watcher with lifecycle=True",
            )
        last = self._last_freeze
        if last is not None and last[0] == freeze and last[1] != self._conn_no:
            return
        before = self._conn_no
        try:
            self._request(_protocol.confirm(freeze))
        except _errors.Refused as e:
            # The daemon restarted during the request: the new one never
            # asked for this freeze.
            if not (e.code == _errors.WRONG_FREEZE and self._conn_no != before):
                raise

    def skip(self, generation):
        """Leaves ``generation`` unacknowledged (the watcher stays outdated
        and keeps holding up ``wait_watchers``) but stops reporting it: the
        next :meth:`read_event` waits for a newer generation or a lifecycle
        event. For a renewal that failed and should not be retried in a
        loop."""
        self._skipped = _u32("generation", generation)

    def wait_watchers(self, timeout=None):
        """The seed's ``SYSGENID_WAIT_WATCHERS``: returns when no tracked
        watcher is outdated; raises :class:`sysgenid.Interrupted` (an
        ``InterruptedError``, ``EINTR``) if this watcher is or becomes
        outdated (handle, ack, retry), :class:`sysgenid.TimedOut` (a
        ``TimeoutError``) after ``timeout`` seconds (``None`` = forever)."""
        self._request(_protocol.wait_watchers(_timeout_ms(timeout)))

    def trigger_update(self, min_generation=0, *, allow_exhaustion=False, kind="unknown",
                       entropy=None, hostname=None):
        """The seed's ``SYSGENID_FORCE_GEN_UPDATE`` (privileged): returns the
        new generation, ``max(min_generation, current + 1)``; see
        :func:`sysgenid.trigger_update` for the keywords."""
        frame = _protocol.bump(_u32("min_generation", min_generation), allow_exhaustion,
                               kind, entropy, hostname)
        try:
            return self._request(frame)
        finally:
            _protocol.wipe(frame)

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
        reply, newest = self._conn.reply_noting_changes(self._events)
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
        conn = Connection.connect(self._socket, self._hello(self._acked))
        try:
            generation = expect_welcome(conn)
        except BaseException:
            conn.close()
            raise
        self._conn.close()
        self._conn = conn
        self._conn_no += 1
        # A daemon that restarted comes up running: a participant that was
        # frozen is told to thaw, unless the new daemon froze it again (it
        # sends that Freeze right behind the Welcome).
        if self._frozen is not None:
            try:
                first = conn.try_peek()
            except _errors.Error:
                first = None
            if not (isinstance(first, _protocol.Event) and first.kind == "freeze"):
                self._events.append(_protocol.Event("thaw", self._frozen[0], generation))


class Control:
    """A connection for status, forced updates, barrier waits and the
    orchestrator's freeze and thaw, without being a watcher. It speaks the
    newest protocol; a daemon that only speaks version 1 is served with
    version 1 (everything but the lifecycle works). ``with Control() as
    c:`` closes it."""

    def __init__(self, runtime_dir=None):
        socket = _socket_path(runtime_dir)
        version = _protocol.PROTOCOL_VERSION
        while True:
            conn = Connection.connect(socket, _protocol.hello_control(version))
            try:
                self.generation_at_connect = expect_welcome(conn)
            except _errors.VersionMismatch as e:
                conn.close()
                if _protocol.MIN_PROTOCOL_VERSION <= e.daemon < version:
                    version = e.daemon
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self.version = version
            return

    def status(self):
        """The daemon's status (a dict)."""
        self._conn.send(_protocol.status())
        return expect_status(self._conn.reply())

    def trigger_update(self, min_generation=0, *, allow_exhaustion=False, kind="unknown",
                       entropy=None, hostname=None):
        """Forced update (privileged): the new generation (see
        :func:`sysgenid.trigger_update`)."""
        frame = _protocol.bump(_u32("min_generation", min_generation), allow_exhaustion,
                               kind, entropy, hostname)
        try:
            self._conn.send(frame)
        finally:
            _protocol.wipe(frame)
        return expect_done(self._conn.reply())

    def wait_watchers(self, timeout=None):
        """Waits until no tracked watcher is outdated (never interrupted:
        this connection is not a watcher); ``TimeoutError`` after
        ``timeout`` seconds (``None`` = forever)."""
        self._conn.send(_protocol.wait_watchers(_timeout_ms(timeout)))
        expect_done(self._conn.reply())

    def freeze(self, timeout=None):
        """Freezes every lifecycle participant (privileged, like a forced
        update). Returns the generation once the system is frozen (at once
        if it already is); :class:`sysgenid.FreezeAborted` (a
        ``TimeoutError``) if ``timeout`` seconds (``None``: the daemon's
        default, 30 s) passed first, in which case everyone was thawed
        again; ``EBUSY`` (:class:`sysgenid.Refused`) while another freeze is
        in progress."""
        self._require_lifecycle()
        self._conn.send(_protocol.freeze(_timeout_ms(timeout)))
        return expect_done(self._conn.reply())

    def thaw(self):
        """Thaws (privileged): the generation. Succeeds and changes nothing
        when not frozen; a freeze still in progress is aborted."""
        self._require_lifecycle()
        self._conn.send(_protocol.thaw())
        return expect_done(self._conn.reply())

    def _require_lifecycle(self):
        if self.version < _protocol.LIFECYCLE_VERSION:
            raise _errors.VersionMismatch(
                self.version,
                "this sysgenidd speaks protocol %d, which has no snapshot lifecycle "
                "(freeze/thaw need protocol %d): upgrade the daemon"
                % (self.version, _protocol.LIFECYCLE_VERSION),
            )

    def close(self):
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def trigger_update(min_generation=0, *, runtime_dir=None, allow_exhaustion=False,
                   kind="unknown", entropy=None, hostname=None):
    """A forced update (the seed's ``SYSGENID_FORCE_GEN_UPDATE``): returns
    the new generation, ``max(min_generation, current + 1)``. Needs
    CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (or the daemon's own uid for a
    per-user daemon): :class:`sysgenid.PermissionDenied`, a
    ``PermissionError``, otherwise. :class:`sysgenid.Overflow` when it
    would pass 2**32 - 1, and when a minimum jumps into the counter's last
    2**20 values (which would leave no generation for later restores)
    unless ``allow_exhaustion`` is true. Nothing changes on an error.

    ``kind`` (``"clone"``, ``"restore"`` or ``"unknown"``) says what the
    change is (hooks get ``SYSGENID_KIND``, status ``last_change_kind``);
    ``entropy`` (32 to 512 bytes) is mixed into the kernel's pool before
    the daemon reseeds it and draws the new epoch; ``hostname`` (a valid
    hostname, at most 64 bytes) is given to the hooks as
    ``SYSGENID_HOSTNAME``. Bad values raise ``ValueError`` before anything
    is sent."""
    with Control(runtime_dir) as c:
        return c.trigger_update(min_generation, allow_exhaustion=allow_exhaustion, kind=kind,
                                entropy=entropy, hostname=hostname)


def freeze(timeout=None, *, runtime_dir=None):
    """Freezes every lifecycle participant; see :meth:`Control.freeze`.
    The freeze lasts until :func:`thaw` (or a restore, or the daemon's
    bound), not just while this call's connection is open."""
    with Control(runtime_dir) as c:
        return c.freeze(timeout)


def thaw(*, runtime_dir=None):
    """Thaws; see :meth:`Control.thaw`."""
    with Control(runtime_dir) as c:
        return c.thaw()


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
