"""Whom the client believes, exactly as the Rust client (``trust.rs``): a
generation is only worth something if it comes from the daemon the caller
meant. Before a connection or a mapping is used its owner is checked: root
(the system daemon) or this process's own effective uid (a per-user daemon
it started). Anyone else is refused with :class:`~sysgenid.Untrusted`,
naming the path and the owner found.

For the socket the owner is the daemon *process* (``SO_PEERCRED``, fixed by
the kernel when the daemon called ``listen``), not the socket file. For the
page it is the file's owner, and the file must not be writable by group or
others (the daemon creates it ``0444``).
"""

import os
import socket
import stat
import struct

from ._errors import NotRunning, Untrusted
from ._protocol import RUNTIME_DIR_ENV, SYSTEM_RUNTIME_DIR

_UCRED = struct.Struct("iII")  # pid_t pid; uid_t uid; gid_t gid


def default_runtime_dir():
    """``$SYSGENID_RUNTIME_DIR`` if set and not empty, else
    ``/run/sysgenid``, for every uid (the other clients' contract)."""
    return os.environ.get(RUNTIME_DIR_ENV) or SYSTEM_RUNTIME_DIR


def trusted_uid(uid):
    return uid == 0 or uid == os.geteuid()


def check_daemon(sock, path):
    """Checks the process listening on the other end of a connected socket."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as e:
        raise NotRunning(path, e) from None
    pid, uid, _gid = _UCRED.unpack(raw)
    if not trusted_uid(uid):
        raise Untrusted(
            path, uid, os.geteuid(), "the daemon answering there (pid %d) runs as uid %d" % (pid, uid)
        )


def check_page(fd, path):
    """Checks an opened page file before it is mapped."""
    st = os.fstat(fd)
    if not trusted_uid(st.st_uid):
        raise Untrusted(path, st.st_uid, os.geteuid(), "the page is owned by uid %d" % st.st_uid)
    if st.st_mode & 0o022:
        raise Untrusted(
            path,
            st.st_uid,
            os.geteuid(),
            "the page is writable by others (mode %04o), so anyone could set the generation"
            % stat.S_IMODE(st.st_mode),
        )
