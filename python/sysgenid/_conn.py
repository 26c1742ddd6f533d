"""One non-blocking ``SOCK_SEQPACKET`` connection to the daemon and the
frame operations the watcher and the control connection are built from.
A line-by-line counterpart of the Rust client's ``conn.rs``: peek for
``Changed`` frames (dropping older ones while more bytes are queued, so the
newest stays queued and the descriptor stays readable), and consume frames
only up to the reply of a request.
"""

import errno
import fcntl
import select
import socket
import struct
import termios
import time

from . import _errors, _protocol, _trust

WOULD_BLOCK = object()
"""Result of a non-blocking attempt that found nothing."""


def wait_fd(fd, events, timeout=None):
    """Waits until ``fd`` has ``events`` (or hangs up); ``timeout`` in
    seconds, ``None`` forever. True if ready."""
    poller = select.poll()
    poller.register(fd, events)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return bool(poller.poll(ms))


class Connection:
    """A connected socket that has sent its ``Hello``."""

    def __init__(self, sock):
        self.sock = sock
        self._buf = bytearray(_protocol.MAX_FRAME)

    @classmethod
    def connect(cls, path, hello):
        """Connects to ``path``, checks who answers, and sends ``hello``
        (the ``Welcome`` is read by the caller)."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError as e:
            raise _errors.NotRunning(path, e) from None
        try:
            sock.setblocking(False)
            # A non-blocking AF_UNIX connect fails with EAGAIN when the
            # daemon's listen backlog is full; the connection is then not
            # queued, so retry with backoff.
            delay = 0.001
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError as e:
                    if e.errno == errno.EINPROGRESS:
                        wait_fd(sock.fileno(), select.POLLOUT)
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
                except OSError as e:
                    raise _errors.NotRunning(path, e) from None
            # Nothing is sent, not even Hello, to a daemon we do not trust.
            _trust.check_daemon(sock, path)
            conn = cls(sock)
            try:
                conn.send(hello)
            except _errors.Disconnected:
                # The daemon may have refused us (a limit) and hung up
                # before our Hello: its reason is still queued for us.
                try:
                    reply = conn.try_recv()
                except _errors.Error:
                    reply = None
                if isinstance(reply, _protocol.ErrorReply):
                    raise reply.exception() from None
                raise
            return conn
        except BaseException:
            sock.close()
            raise

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    def send(self, frame):
        while True:
            try:
                self.sock.send(frame, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                wait_fd(self.sock.fileno(), select.POLLOUT)
            except (ConnectionResetError, BrokenPipeError):
                raise _errors.Disconnected() from None

    def try_recv(self):
        """Receives one frame without blocking, or :data:`WOULD_BLOCK`."""
        return self._try_recv_flags(0)

    def try_peek(self):
        """Peeks at the first frame without consuming it."""
        return self._try_recv_flags(socket.MSG_PEEK)

    def _try_recv_flags(self, flags):
        reset_seen = False
        while True:
            try:
                n = self.sock.recv_into(
                    self._buf,
                    _protocol.MAX_FRAME,
                    flags | socket.MSG_DONTWAIT | socket.MSG_TRUNC,
                )
            except BlockingIOError:
                return WOULD_BLOCK
            except ConnectionResetError:
                # The kernel reports a reset once, ahead of frames still
                # queued: read on, so the daemon's last error frame is not
                # lost.
                if reset_seen:
                    raise _errors.Disconnected() from None
                reset_seen = True
                continue
            except BrokenPipeError:
                raise _errors.Disconnected() from None
            if n == 0:
                raise _errors.Disconnected()
            if n > _protocol.MAX_FRAME:
                raise _errors.ProtocolError(
                    "a %d-byte frame from the daemon exceeds the %d-byte limit"
                    % (n, _protocol.MAX_FRAME)
                )
            return _protocol.decode_reply(bytes(self._buf[:n]))

    def queued_bytes(self):
        """Bytes queued for reading (all frames)."""
        try:
            raw = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return struct.unpack("i", raw)[0]

    def reply(self):
        """Blocking: the reply to the request just sent (``Changed`` frames
        before it are consumed)."""
        return self.reply_noting_changes([])[0]

    def reply_noting_changes(self, events):
        """Like :meth:`reply`, also returning the newest generation the
        consumed ``Changed`` frames announced (or ``None``). Lifecycle
        events met on the way are appended, in order, to ``events``."""
        newest = None
        while True:
            frame = self.try_recv()
            if frame is WOULD_BLOCK:
                wait_fd(self.sock.fileno(), select.POLLIN)
            elif isinstance(frame, _protocol.Changed):
                newest = frame.generation if newest is None else max(newest, frame.generation)
            elif isinstance(frame, _protocol.Event):
                events.append(frame)
            else:
                return frame, newest

    def await_trailing_changed(self):
        """After a reply to a watcher that is still outdated the daemon
        sends a ``Changed`` right behind it; wait for it (bounded, in case
        the daemon died) so the descriptor is readable again."""
        wait_fd(self.sock.fileno(), select.POLLIN, 1.0)

    def try_changed(self):
        """Non-blocking read of the newest pending change, leaving one
        ``Changed`` frame queued; :data:`WOULD_BLOCK` if none."""
        while True:
            frame = self.try_peek()
            if frame is WOULD_BLOCK:
                return WOULD_BLOCK
            if isinstance(frame, _protocol.Changed):
                # Older Changed frames ahead of the newest are redundant.
                if self.queued_bytes() > _protocol.CHANGED_LEN:
                    self.try_recv()
                    continue
                return frame.generation
            if isinstance(frame, _protocol.ErrorReply):
                try:
                    self.try_recv()
                except _errors.Error:
                    pass
                raise frame.exception()
            raise _errors.ProtocolError("unexpected frame %r" % (frame,))

    def try_event(self, skip=None):
        """Non-blocking read of a lifecycle participant's next event, or
        :data:`WOULD_BLOCK`: a ``Freeze`` or ``Thaw`` frame is consumed; a
        ``Changed`` frame is left queued (the socket stays readable while
        outdated) unless more frames follow it, or it announces ``skip``, a
        generation the caller chose not to acknowledge yet (then it is
        consumed, so the caller blocks until something new arrives)."""
        while True:
            frame = self.try_peek()
            if frame is WOULD_BLOCK:
                return WOULD_BLOCK
            if isinstance(frame, _protocol.Changed):
                more = self.queued_bytes() > _protocol.CHANGED_LEN
                if more or skip == frame.generation:
                    self.try_recv()
                    continue
                return _protocol.Event("change", 0, frame.generation)
            if isinstance(frame, _protocol.Event):
                self.try_recv()
                return frame
            if isinstance(frame, _protocol.ErrorReply):
                try:
                    self.try_recv()
                except _errors.Error:
                    pass
                raise frame.exception()
            raise _errors.ProtocolError("unexpected frame %r" % (frame,))


def expect_done(reply):
    if isinstance(reply, _protocol.Done):
        return reply.generation
    if isinstance(reply, _protocol.ErrorReply):
        raise reply.exception()
    raise _errors.ProtocolError("unexpected reply %r" % (reply,))


def expect_status(reply):
    if isinstance(reply, _protocol.Status):
        return reply.report
    if isinstance(reply, _protocol.ErrorReply):
        raise reply.exception()
    raise _errors.ProtocolError("expected Status, got %r" % (reply,))


def expect_welcome(conn):
    """The generation of the ``Welcome`` that answers our ``Hello``; a
    version this client does not speak is refused (and the caller hangs
    up)."""
    reply = conn.reply()
    if isinstance(reply, _protocol.Welcome):
        if reply.version not in _protocol.SUPPORTED_VERSIONS:
            raise _errors.VersionMismatch(
                reply.version,
                "sysgenidd answered with protocol version %d; this client speaks versions %s"
                % (reply.version, ", ".join(map(str, _protocol.SUPPORTED_VERSIONS))),
            )
        return reply.generation
    if isinstance(reply, _protocol.ErrorReply):
        raise reply.exception()
    raise _errors.ProtocolError("expected Welcome, got %r" % (reply,))
