"""The exceptions of the Python client, one per error of the Rust client.

Every exception is an :class:`OSError` carrying the errno a kernel
implementation of the seed's ``/dev/sysgenid`` would have returned, and,
where Python has a matching built-in class, is also an instance of it
(``BlockingIOError``, ``InterruptedError``, ``TimeoutError``,
``PermissionError``, ``ConnectionError``), so callers can catch either.
"""

import errno as _errno

# Error codes of the wire protocol (docs/protocol.md).
WRONG_GENERATION = 1
INTERRUPTED = 2
TIMED_OUT = 3
PERMISSION_DENIED = 4
OVERFLOW = 5
VERSION_MISMATCH = 6
PROTOCOL_VIOLATION = 7
NOT_A_WATCHER = 8
TOO_MANY_WATCHERS = 9
SHUTTING_DOWN = 10
INTERNAL = 11
FREEZE_ABORTED = 12
NOT_A_PARTICIPANT = 13
BUSY = 14
WRONG_FREEZE = 15

CODE_NAMES = {
    WRONG_GENERATION: "WrongGeneration",
    INTERRUPTED: "Interrupted",
    TIMED_OUT: "TimedOut",
    PERMISSION_DENIED: "PermissionDenied",
    OVERFLOW: "Overflow",
    VERSION_MISMATCH: "VersionMismatch",
    PROTOCOL_VIOLATION: "ProtocolViolation",
    NOT_A_WATCHER: "NotAWatcher",
    TOO_MANY_WATCHERS: "TooManyWatchers",
    SHUTTING_DOWN: "ShuttingDown",
    INTERNAL: "Internal",
    FREEZE_ABORTED: "FreezeAborted",
    NOT_A_PARTICIPANT: "NotAParticipant",
    BUSY: "Busy",
    WRONG_FREEZE: "WrongFreeze",
}

CODE_ERRNO = {
    WRONG_GENERATION: _errno.EINVAL,
    INTERRUPTED: _errno.EINTR,
    TIMED_OUT: _errno.ETIMEDOUT,
    PERMISSION_DENIED: _errno.EACCES,
    OVERFLOW: _errno.EOVERFLOW,
    VERSION_MISMATCH: _errno.EPROTONOSUPPORT,
    PROTOCOL_VIOLATION: _errno.EPROTO,
    NOT_A_WATCHER: _errno.ENOTCONN,
    TOO_MANY_WATCHERS: _errno.EUSERS,
    SHUTTING_DOWN: _errno.ESHUTDOWN,
    INTERNAL: _errno.EIO,
    FREEZE_ABORTED: _errno.ETIMEDOUT,
    NOT_A_PARTICIPANT: _errno.ENOTCONN,
    BUSY: _errno.EBUSY,
    WRONG_FREEZE: _errno.EINVAL,
}


class Error(OSError):
    """Base class of every error this package raises."""

    def __init__(self, err, message):
        super().__init__(err, message)


class NotRunning(Error, ConnectionError):
    """The daemon's socket or page could not be reached (``.path``)."""

    def __init__(self, path, cause):
        self.path = str(path)
        self.cause = cause
        err = cause.errno if isinstance(cause, OSError) and cause.errno else _errno.ENOENT
        super().__init__(
            err,
            "cannot reach sysgenidd at %s: %s. Is the daemon running? Start it with "
            "`sysgenidd` (as root) or point SYSGENID_RUNTIME_DIR at its runtime directory"
            % (path, cause.strerror if isinstance(cause, OSError) and cause.strerror else cause),
        )


class Untrusted(Error):
    """The socket or page is served by someone other than root or this
    process's effective uid (``.path``, ``.owner``, ``.caller``): it may
    have been planted by another user (``EPERM``)."""

    def __init__(self, path, owner, caller, why):
        self.path = str(path)
        self.owner = owner
        self.caller = caller
        super().__init__(
            _errno.EPERM,
            "refusing %s: %s, not by root or by this process's uid %d; it may have been "
            "planted by another user. Use the system daemon (/run/sysgenid, the default) or "
            "point SYSGENID_RUNTIME_DIR at a daemon run by root or by you" % (path, why, caller),
        )


class WouldBlock(Error, BlockingIOError):
    """Non-blocking read with nothing new (``EAGAIN``)."""

    def __init__(self):
        super().__init__(_errno.EAGAIN, "no new generation (would block)")


class WrongGeneration(Error):
    """The acknowledged value is not current (``EINVAL``); ``.current``."""

    def __init__(self, current, message):
        self.current = current
        super().__init__(_errno.EINVAL, message)


class Interrupted(Error, InterruptedError):
    """This watcher is outdated (``EINTR``): handle ``.generation``, ack,
    retry."""

    def __init__(self, generation, message):
        self.generation = generation
        super().__init__(_errno.EINTR, message)


class TimedOut(Error, TimeoutError):
    """Barrier timeout (``ETIMEDOUT``); ``.outdated`` tracked watchers were
    still outdated."""

    def __init__(self, outdated, message):
        self.outdated = outdated
        super().__init__(_errno.ETIMEDOUT, message)


class FreezeAborted(Error, TimeoutError):
    """The freeze was aborted (timed out, thawed, or a restore came first)
    and every participant was thawed (``ETIMEDOUT``); ``.pending`` tracked
    participants (and hooks) had not confirmed."""

    def __init__(self, pending, message):
        self.pending = pending
        super().__init__(_errno.ETIMEDOUT, message)


class PermissionDenied(Error, PermissionError):
    """Not privileged to bump, freeze or thaw (``EACCES``)."""

    def __init__(self, message):
        super().__init__(_errno.EACCES, message)


class Overflow(Error):
    """A bump past 2**32 - 1 (``EOVERFLOW``); ``.current`` stays."""

    def __init__(self, current, message):
        self.current = current
        super().__init__(_errno.EOVERFLOW, message)


class VersionMismatch(Error):
    """The daemon speaks another protocol version (``.daemon``)."""

    def __init__(self, daemon, message):
        self.daemon = daemon
        super().__init__(_errno.EPROTONOSUPPORT, message)


class Refused(Error):
    """Any other refusal by the daemon (``.code``: the protocol's code)."""

    def __init__(self, code, message):
        self.code = code
        name = CODE_NAMES.get(code, str(code))
        super().__init__(
            CODE_ERRNO.get(code, _errno.EIO), "sysgenidd refused: %s (%s)" % (message, name)
        )


class Disconnected(Error, ConnectionResetError):
    """The daemon closed the connection (it stopped or restarted)."""

    def __init__(self):
        super().__init__(
            _errno.ECONNRESET, "sysgenidd closed the connection (stopped or restarting)"
        )


class ProtocolError(Error):
    """The daemon sent something this client does not understand."""

    def __init__(self, message):
        super().__init__(_errno.EPROTO, "protocol error: " + message)


def from_reply(code, value, message):
    """The exception for an ``Error`` frame."""
    if code == WRONG_GENERATION:
        return WrongGeneration(value, message)
    if code == INTERRUPTED:
        return Interrupted(value, message)
    if code == TIMED_OUT:
        return TimedOut(value, message)
    if code == PERMISSION_DENIED:
        return PermissionDenied(message)
    if code == OVERFLOW:
        return Overflow(value, message)
    if code == VERSION_MISMATCH:
        return VersionMismatch(value & 0xFFFF, message)
    if code == FREEZE_ABORTED:
        return FreezeAborted(value, message)
    return Refused(code, message)
