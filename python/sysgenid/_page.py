"""The mapped generation page (``crates/sysgenid-page``): a 4096-byte file
the daemon rewrites in place, mapped read-only here.

Layout (native-endian, naturally aligned): ``generation`` u32 at 0, the
seqlock ``seq`` u32 at 4 (odd while a record is being written), ``magic``
``"SGID"`` at 8, ``layout`` u32 at 12, the 128-bit ``epoch`` at 16 and
``changed_unix_ns`` u64 at 32.

:attr:`Probe.generation` is one aligned 4-byte load of offset 0 (through a
``memoryview`` cast to unsigned ints, which copies the word with one
``memcpy`` of 4 bytes): the daemon changes it with a single atomic store,
so it is never torn. :meth:`Probe.record` reads the whole record under the
seqlock, as the Rust reader does: ``seq``, the fields, ``seq`` again, retry
while odd or changed. CPython issues these loads in program order; on
x86-64 (total store order) that is enough. A writer killed between its two
``seq`` stores leaves ``seq`` odd until the next daemon republishes; a
reader that sees the same odd value for about 20 ms takes the fields as
they are (the generation word is always whole), like the Rust reader.
"""

import mmap
import os
import sys
import time

from . import _errors, _protocol, _trust

PAGE_SIZE = 4096
PAGE_MAGIC = int.from_bytes(b"SGID", "little")
_STUCK_ODD_SECONDS = 0.02


class Record:
    """One consistent view of the page: ``generation``, ``epoch`` (16
    bytes; differs between clones restored from one snapshot),
    ``changed_unix_ns`` (0 if the generation never changed)."""

    __slots__ = ("generation", "epoch", "changed_unix_ns")

    def __init__(self, generation, epoch, changed_unix_ns):
        self.generation = generation
        self.epoch = epoch
        self.changed_unix_ns = changed_unix_ns

    def __eq__(self, other):
        return isinstance(other, Record) and (
            self.generation,
            self.epoch,
            self.changed_unix_ns,
        ) == (other.generation, other.epoch, other.changed_unix_ns)

    def __repr__(self):
        return "Record(generation=%d, epoch=%s, changed_unix_ns=%d)" % (
            self.generation,
            self.epoch.hex(),
            self.changed_unix_ns,
        )


class Probe:
    """The daemon's page, mapped read-only: ``probe.generation`` is one
    memory read, no system call. The mapping stays valid and current across
    bumps and daemon restarts. ``runtime_dir`` defaults to
    :func:`sysgenid.default_runtime_dir`; the page must be owned by root or
    this process's uid and writable by nobody else (:class:`Untrusted`)."""

    def __init__(self, runtime_dir=None):
        path = os.path.join(runtime_dir or _trust.default_runtime_dir(), _protocol.PAGE_NAME)
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _errors.NotRunning(path, e) from None
        try:
            _trust.check_page(fd, path)
            size = os.fstat(fd).st_size
            if size < PAGE_SIZE:
                raise _errors.ProtocolError(
                    "%s is not a sysgenid generation page: %d bytes, expected %d"
                    % (path, size, PAGE_SIZE)
                )
            self._map = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._u32 = memoryview(self._map).cast("I")
        self._u64 = memoryview(self._map).cast("Q")
        if self._u32[2] != PAGE_MAGIC:
            magic = self._u32[2]
            self.close()
            raise _errors.ProtocolError(
                "%s is not a sysgenid generation page: magic %#010x, expected %#010x"
                % (path, magic, PAGE_MAGIC)
            )

    @property
    def generation(self):
        """The current generation: one 4-byte read of offset 0."""
        return self._u32[0]

    def record(self):
        """Generation, epoch and change time, read consistently."""
        u32 = self._u32
        last_odd = None
        odd_since = 0.0
        while True:
            before = u32[1]
            if before & 1:
                now = time.monotonic()
                if before != last_odd:
                    last_odd, odd_since = before, now
                elif now - odd_since > _STUCK_ODD_SECONDS:
                    return self._raw_record()
                time.sleep(0)
                continue
            record = self._raw_record()
            if u32[1] == before:
                return record

    def _raw_record(self):
        u32 = self._u32
        generation = u32[0]
        epoch = b"".join(u32[4 + i].to_bytes(4, sys.byteorder) for i in range(4))
        return Record(generation, epoch, self._u64[4])

    def close(self):
        """Unmaps the page (idempotent)."""
        if getattr(self, "_map", None) is None:
            return
        self._u32.release()
        self._u64.release()
        self._map.close()
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "Probe(%r, generation=%d)" % (self.path, self.generation)

