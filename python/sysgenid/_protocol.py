"""The wire protocol of ``docs/protocol.md`` (version 1): frame encoding
and decoding, kept apart from any I/O. Mirrors ``crates/sysgenid-proto``.

Every frame is one ``SOCK_SEQPACKET`` datagram: a kind byte followed by
fixed little-endian fields.
"""

import json
import struct

from . import _errors

PROTOCOL_VERSION = 2
"""The newest protocol version this package speaks."""
MIN_PROTOCOL_VERSION = 1
"""What plain watchers announce, so they work with any daemon."""
LIFECYCLE_VERSION = 2
"""The first version with the snapshot lifecycle (participants, freeze,
thaw)."""
SUPPORTED_VERSIONS = (1, 2)
MAX_FRAME = 2048
SOCKET_NAME = "sysgenid.sock"
PAGE_NAME = "generation"
RUNTIME_DIR_ENV = "SYSGENID_RUNTIME_DIR"
SYSTEM_RUNTIME_DIR = "/run/sysgenid"

HELLO = 0x01
ACK = 0x02
WAIT_WATCHERS = 0x03
BUMP = 0x04
STATUS = 0x05
FREEZE = 0x06
THAW = 0x07
CONFIRM = 0x08
WELCOME = 0x81
CHANGED = 0x82
DONE = 0x83
STATUS_REPORT = 0x84
FREEZE_EVENT = 0x85
THAW_EVENT = 0x86
ERROR = 0xFF

_ROLE_CONTROL = 0
_ROLE_WATCHER = 1
_FLAG_UNTRACKED = 1 << 0
_FLAG_HAS_ACKED = 1 << 1
_FLAG_LIFECYCLE = 1 << 2
_BUMP_ALLOW_EXHAUSTION = 1 << 0
_BUMP_DETAILS = 1 << 1

KINDS = ("unknown", "clone", "restore")
"""The kinds of change a bump may announce (their wire codes: 0, 1, 2)."""
MIN_ENTROPY = 32
MAX_ENTROPY = 512
MAX_HOSTNAME = 64
_LABEL = __import__("re").compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def check_hostname(name):
    """Raises ``ValueError`` unless ``name`` is a valid hostname of at most
    64 bytes (RFC 1123 labels), as the daemon checks it."""
    if not isinstance(name, str) or not name or len(name.encode()) > MAX_HOSTNAME:
        raise ValueError(f"{name!r} is not a valid hostname: 1 to {MAX_HOSTNAME} bytes")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise ValueError(
                f"{name!r} is not a valid hostname: labels are 1 to 63 ASCII letters, "
                "digits and hyphens, not starting or ending with a hyphen"
            )

CHANGED_LEN = 5


def hello_control(version=PROTOCOL_VERSION):
    return struct.pack("<BHBBI", HELLO, version, _ROLE_CONTROL, 0, 0)


def hello_watcher(untracked, acked=None, lifecycle=False):
    """A watcher's ``Hello``: plain watchers announce version 1 (any
    daemon), lifecycle participants the lifecycle's version."""
    flags = (_FLAG_UNTRACKED if untracked else 0) | (0 if acked is None else _FLAG_HAS_ACKED)
    if lifecycle:
        flags |= _FLAG_LIFECYCLE
    version = LIFECYCLE_VERSION if lifecycle else MIN_PROTOCOL_VERSION
    return struct.pack(
        "<BHBBI", HELLO, version, _ROLE_WATCHER, flags, 0 if acked is None else acked
    )


def hello_version(hello):
    return struct.unpack_from("<H", hello, 1)[0]


def ack(generation):
    return struct.pack("<BI", ACK, generation)


def wait_watchers(timeout_ms):
    return struct.pack("<BI", WAIT_WATCHERS, timeout_ms)


def bump(min_generation, allow_exhaustion=False, kind="unknown", entropy=None, hostname=None):
    """A forced update; ``allow_exhaustion`` adds the optional sixth byte
    that lets a minimum jump into the counter's last 2**20 values. A
    ``kind`` other than unknown, ``entropy`` (32 to 512 bytes) or a
    ``hostname`` set flag bit 1 and follow it (``docs/protocol.md``); bad
    values raise ``ValueError``. Returns a ``bytearray`` the caller may
    wipe once sent."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: the kind of change is clone, restore or unknown")
    if entropy is not None and not MIN_ENTROPY <= len(entropy) <= MAX_ENTROPY:
        raise ValueError(
            f"entropy must be {MIN_ENTROPY} to {MAX_ENTROPY} bytes, and this is {len(entropy)} bytes"
        )
    if hostname is not None:
        check_hostname(hostname)
    detailed = kind != "unknown" or entropy is not None or hostname is not None
    flags = (_BUMP_ALLOW_EXHAUSTION if allow_exhaustion else 0) | (_BUMP_DETAILS if detailed else 0)
    frame = bytearray(struct.pack("<BI", BUMP, min_generation))
    if flags:
        frame.append(flags)
    if detailed:
        frame.append(KINDS.index(kind))
        frame += struct.pack("<H", 0 if entropy is None else len(entropy))
        frame += b"" if entropy is None else bytes(entropy)
        name = b"" if hostname is None else hostname.encode()
        frame.append(len(name))
        frame += name
    return frame


def wipe(frame):
    """Zeroes a frame that carried entropy."""
    frame[:] = bytes(len(frame))


def freeze(timeout_ms):
    return struct.pack("<BI", FREEZE, timeout_ms)


def thaw():
    return bytes([THAW])


def confirm(freeze_number):
    return struct.pack("<BI", CONFIRM, freeze_number)


def status():
    return bytes([STATUS])


class Welcome:
    __slots__ = ("version", "generation")

    def __init__(self, version, generation):
        self.version = version
        self.generation = generation

    def __repr__(self):
        return "Welcome(version=%d, generation=%d)" % (self.version, self.generation)


class Changed:
    __slots__ = ("generation",)

    def __init__(self, generation):
        self.generation = generation

    def __repr__(self):
        return "Changed(%d)" % self.generation


class Event:
    """What a lifecycle participant is told, in the order it happened:
    ``kind`` is ``"freeze"`` (quiesce, then confirm ``freeze``), ``"thaw"``
    (resume: that freeze ended) or ``"change"`` (renew, then ack
    ``generation``; reported again until acknowledged). ``freeze`` is 0
    for a change."""

    __slots__ = ("kind", "freeze", "generation")

    def __init__(self, kind, freeze, generation):
        self.kind = kind
        self.freeze = freeze
        self.generation = generation

    def __eq__(self, other):
        return isinstance(other, Event) and (self.kind, self.freeze, self.generation) == (
            other.kind,
            other.freeze,
            other.generation,
        )

    def __hash__(self):
        return hash((self.kind, self.freeze, self.generation))

    def __repr__(self):
        if self.kind == "change":
            return "Event('change', generation=%d)" % self.generation
        return "Event(%r, freeze=%d, generation=%d)" % (self.kind, self.freeze, self.generation)


class Done:
    __slots__ = ("generation",)

    def __init__(self, generation):
        self.generation = generation

    def __repr__(self):
        return "Done(%d)" % self.generation


class Status:
    __slots__ = ("report",)

    def __init__(self, report):
        self.report = report

    def __repr__(self):
        return "Status(%r)" % (self.report,)


class ErrorReply:
    __slots__ = ("code", "value", "message")

    def __init__(self, code, value, message):
        self.code = code
        self.value = value
        self.message = message

    def exception(self):
        return _errors.from_reply(self.code, self.value, self.message)

    def __repr__(self):
        return "ErrorReply(%s, %d, %r)" % (
            _errors.CODE_NAMES.get(self.code, self.code),
            self.value,
            self.message,
        )


def _expect_len(frame, expected):
    if len(frame) != expected:
        raise _errors.ProtocolError(
            "frame of kind %#04x has %d bytes, expected %d" % (frame[0], len(frame), expected)
        )


def decode_reply(frame):
    """One daemon frame as a reply object; :class:`ProtocolError` if it is
    not one this version defines."""
    if not frame:
        raise _errors.ProtocolError("empty frame")
    if len(frame) > MAX_FRAME:
        raise _errors.ProtocolError(
            "frame of %d bytes exceeds the %d-byte limit" % (len(frame), MAX_FRAME)
        )
    kind = frame[0]
    if kind == WELCOME:
        _expect_len(frame, 7)
        version, generation = struct.unpack_from("<HI", frame, 1)
        return Welcome(version, generation)
    if kind in (CHANGED, DONE):
        _expect_len(frame, 5)
        (generation,) = struct.unpack_from("<I", frame, 1)
        return Changed(generation) if kind == CHANGED else Done(generation)
    if kind in (FREEZE_EVENT, THAW_EVENT):
        _expect_len(frame, 9)
        freeze_number, generation = struct.unpack_from("<II", frame, 1)
        return Event("freeze" if kind == FREEZE_EVENT else "thaw", freeze_number, generation)
    if kind == STATUS_REPORT:
        try:
            report = json.loads(bytes(frame[1:]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _errors.ProtocolError("status report is not valid JSON") from None
        if not isinstance(report, dict):
            raise _errors.ProtocolError("status report is not a JSON object")
        return Status(report)
    if kind == ERROR:
        if len(frame) < 7:
            raise _errors.ProtocolError(
                "frame of kind %#04x has %d bytes, expected 7" % (kind, len(frame))
            )
        code, value = struct.unpack_from("<HI", frame, 1)
        if code not in _errors.CODE_NAMES:
            raise _errors.ProtocolError("invalid field: unknown error code")
        return ErrorReply(code, value, bytes(frame[7:]).decode("utf-8", "replace"))
    raise _errors.ProtocolError("unknown frame kind %#04x" % kind)
