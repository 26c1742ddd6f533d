"""Pure-Python client for ``sysgenidd``, the System Generation ID daemon.

The system generation is a 32-bit counter that increases every time this
machine is restored from a snapshot or cloned. Code that holds state which
must be unique (RNG seeds, UUID generators, keys, leases) watches it,
renews that state when it changes, and acknowledges the new value, so an
orchestrator can wait until everyone has caught up::

    import sysgenid

    with sysgenid.Watcher() as w:
        while True:
            generation = w.read()      # blocks until a restore
            reseed()                   # renew what must be unique
            w.ack(generation)          # tell the system we are done

* :class:`Watcher`: one watcher, as one open handle of the seed's
  ``/dev/sysgenid`` (``read``, ``ack``, ``fileno``, ``wait_watchers``).
* :class:`Probe`: the mapped page; ``Probe().generation`` is one memory
  read.
* :func:`trigger_update`, :func:`status`, :func:`wait_watchers`,
  :class:`Control`: without being a watcher.
* The snapshot lifecycle: ``Watcher(lifecycle=True)`` is a participant
  that :meth:`Watcher.read_event` tells to freeze, thaw or renew
  (:class:`Event`) and that :meth:`Watcher.confirm`\ s each freeze;
  :func:`freeze` and :func:`thaw` are the orchestrator's side.
* :mod:`sysgenid.aio`: asyncio (:func:`sysgenid.aio.changes`).
* :mod:`sysgenid.snapsafe`: reseed :mod:`random` after a restore.

It speaks the socket protocol of ``docs/protocol.md`` with the standard
library only. The runtime directory is ``$SYSGENID_RUNTIME_DIR`` if set,
else ``/run/sysgenid`` (the system daemon's), and a socket or page served
by anyone other than root or this process's uid is refused
(:class:`Untrusted`).
"""

from ._errors import (
    Disconnected,
    Error,
    FreezeAborted,
    Interrupted,
    NotRunning,
    Overflow,
    PermissionDenied,
    ProtocolError,
    Refused,
    TimedOut,
    Untrusted,
    VersionMismatch,
    WouldBlock,
    WrongGeneration,
)
from ._page import Probe, Record
from ._protocol import PROTOCOL_VERSION, Event
from ._trust import default_runtime_dir
from ._watcher import (
    Control,
    Watcher,
    freeze,
    status,
    thaw,
    trigger_update,
    wait_watchers,
)

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Control",
    "Disconnected",
    "Error",
    "Event",
    "FreezeAborted",
    "Interrupted",
    "NotRunning",
    "Overflow",
    "PermissionDenied",
    "Probe",
    "ProtocolError",
    "Record",
    "Refused",
    "TimedOut",
    "Untrusted",
    "VersionMismatch",
    "WouldBlock",
    "WrongGeneration",
    "Watcher",
    "default_runtime_dir",
    "freeze",
    "status",
    "thaw",
    "trigger_update",
    "wait_watchers",
]
