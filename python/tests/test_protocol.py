"""Frames as docs/protocol.md defines them, and how the client treats a
daemon that does not follow them (served by a fake daemon in a thread)."""

import errno
import os
import shutil
import socket
import struct
import threading

import pytest

import sysgenid
from sysgenid import _protocol

from conftest import private_dir


def test_requests_have_the_documented_bytes():
    # Control connections announce the newest version; plain watchers 1
    # (any daemon), lifecycle participants 2 with flag bit 2.
    assert _protocol.hello_control() == bytes([0x01, 2, 0, 0, 0, 0, 0, 0, 0])
    assert _protocol.hello_control(1) == bytes([0x01, 1, 0, 0, 0, 0, 0, 0, 0])
    assert _protocol.hello_watcher(False) == bytes([0x01, 1, 0, 1, 0, 0, 0, 0, 0])
    assert _protocol.hello_watcher(True, 0x01020304) == bytes(
        [0x01, 1, 0, 1, 0b11, 4, 3, 2, 1]
    )
    assert _protocol.hello_watcher(False, None, lifecycle=True) == bytes(
        [0x01, 2, 0, 1, 0b100, 0, 0, 0, 0]
    )
    assert _protocol.ack(7) == b"\x02\x07\x00\x00\x00"
    assert _protocol.wait_watchers(1000) == b"\x03\xe8\x03\x00\x00"
    assert _protocol.bump(10) == b"\x04\x0a\x00\x00\x00"
    assert _protocol.bump(10, allow_exhaustion=True) == b"\x04\x0a\x00\x00\x00\x01"
    assert _protocol.status() == b"\x05"
    assert _protocol.freeze(0) == b"\x06\x00\x00\x00\x00"
    assert _protocol.thaw() == b"\x07"
    assert _protocol.confirm(3) == b"\x08\x03\x00\x00\x00"


def test_replies_decode_and_bad_frames_are_protocol_errors():
    w = _protocol.decode_reply(b"\x81\x01\x00\x05\x00\x00\x00")
    assert (w.version, w.generation) == (1, 5)
    assert _protocol.decode_reply(b"\x82\x09\x00\x00\x00").generation == 9
    assert isinstance(_protocol.decode_reply(b"\x83\x09\x00\x00\x00"), _protocol.Done)
    assert _protocol.decode_reply(b"\x85\x02\0\0\0\x07\0\0\0") == sysgenid.Event("freeze", 2, 7)
    assert _protocol.decode_reply(b"\x86\x02\0\0\0\x08\0\0\0") == sysgenid.Event("thaw", 2, 8)
    s = _protocol.decode_reply(b'\x84{"generation": 3}')
    assert s.report == {"generation": 3}
    e = _protocol.decode_reply(b"\xff\x01\x00\x04\x00\x00\x00not current")
    exc = e.exception()
    assert isinstance(exc, sysgenid.WrongGeneration)
    assert exc.errno == errno.EINVAL and exc.current == 4 and "not current" in str(exc)
    for bad in [b"", b"\x82\x01", b"\x10", b"\x85\x01\0\0\0", b"\x84not json", b"\x84[1]", b"\xff\x63\x00\0\0\0\0",
                b"\xff\x01"]:
        with pytest.raises(sysgenid.ProtocolError):
            _protocol.decode_reply(bad)


def test_every_error_code_maps_to_the_seed_errno():
    expected = {
        1: (sysgenid.WrongGeneration, errno.EINVAL),
        2: (sysgenid.Interrupted, errno.EINTR),
        3: (sysgenid.TimedOut, errno.ETIMEDOUT),
        4: (sysgenid.PermissionDenied, errno.EACCES),
        5: (sysgenid.Overflow, errno.EOVERFLOW),
        6: (sysgenid.VersionMismatch, errno.EPROTONOSUPPORT),
        7: (sysgenid.Refused, errno.EPROTO),
        8: (sysgenid.Refused, errno.ENOTCONN),
        9: (sysgenid.Refused, errno.EUSERS),
        10: (sysgenid.Refused, errno.ESHUTDOWN),
        11: (sysgenid.Refused, errno.EIO),
        12: (sysgenid.FreezeAborted, errno.ETIMEDOUT),
        13: (sysgenid.Refused, errno.ENOTCONN),
        14: (sysgenid.Refused, errno.EBUSY),
        15: (sysgenid.Refused, errno.EINVAL),
    }
    for code, (cls, err) in expected.items():
        exc = _protocol.ErrorReply(code, 0, "m").exception()
        assert isinstance(exc, cls) and isinstance(exc, OSError) and exc.errno == err, code
    assert isinstance(_protocol.ErrorReply(4, 0, "").exception(), PermissionError)
    assert isinstance(_protocol.ErrorReply(2, 0, "").exception(), InterruptedError)
    assert isinstance(_protocol.ErrorReply(3, 0, "").exception(), TimeoutError)


class FakeDaemon:
    """Listens on a SEQPACKET socket and answers the Hello of each
    connection in turn with the frames given for it (``frames``: one list
    per connection, or one list for a single connection)."""

    def __init__(self, frames):
        if frames and isinstance(frames[0], bytes):
            frames = [frames]
        self.dir = private_dir()
        self.path = os.path.join(self.dir, "sysgenid.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen()
        self.frames = frames
        self.hellos = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for frames in self.frames:
            conn, _ = self.sock.accept()
            with conn:
                self.hellos.append(conn.recv(4096))
                for f in frames:
                    conn.send(f)
                if frames and frames[-1][0] == 0xFF:
                    continue  # an error: hang up, as the daemon does
                try:
                    while conn.recv(4096):  # until the client hangs up
                        pass
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def fake_daemon():
    """Starts FakeDaemons; each is closed and its directory removed when
    the test ends, passed or not."""
    fakes = []

    def start(frames):
        fake = FakeDaemon(frames)
        fakes.append(fake)
        return fake

    yield start
    for fake in fakes:
        fake.close()


def test_a_welcome_of_another_version_is_refused_clearly(fake_daemon):
    fake = fake_daemon([b"\x81\x03\x00\x00\x00\x00\x00"])
    with pytest.raises(sysgenid.VersionMismatch) as e:
        sysgenid.Watcher(runtime_dir=fake.dir)
    assert e.value.daemon == 3 and "version 3" in str(e.value)
    assert fake.hellos == [_protocol.hello_watcher(False)]


def test_control_falls_back_to_a_version_1_daemon(fake_daemon):
    mismatch = b"\xff\x06\x00" + struct.pack("<I", 1) + b"this daemon speaks 1"
    welcome_v1 = b"\x81\x01\x00\x05\x00\x00\x00"
    fake = fake_daemon([[mismatch], [welcome_v1]])
    c = sysgenid.Control(fake.dir)
    assert (c.version, c.generation_at_connect) == (1, 5)
    assert fake.hellos == [_protocol.hello_control(2), _protocol.hello_control(1)]
    with pytest.raises(sysgenid.VersionMismatch, match="upgrade the daemon"):
        c.freeze()
    with pytest.raises(sysgenid.VersionMismatch, match="upgrade the daemon"):
        c.thaw()
    c.close()


def test_a_version_mismatch_error_from_the_daemon_is_raised(fake_daemon):
    frame = b"\xff\x06\x00" + struct.pack("<I", 3) + b"daemon speaks 3, client 1"
    fake = fake_daemon([frame])
    with pytest.raises(sysgenid.VersionMismatch) as e:
        sysgenid.Control(fake.dir)
    assert e.value.daemon == 3 and e.value.errno == errno.EPROTONOSUPPORT
    assert len(fake.hellos) == 1, "no fallback to a version above ours"


def test_an_oversized_frame_is_reported_not_misread(fake_daemon):
    fake = fake_daemon([b"\x81\x01\x00\x00\x00\x00\x00", b"\x82" + b"\0" * 3000])
    w = sysgenid.Watcher(runtime_dir=fake.dir, nonblocking=True, reconnect=False)
    assert w.wait_readable(5)
    with pytest.raises(sysgenid.ProtocolError, match="exceeds the 2048-byte limit"):
        w.read()
    w.close()


def test_bump_frames_keep_the_old_layout_and_add_details_after_flag_bit_1():
    assert bytes(_protocol.bump(10)) == bytes([0x04, 10, 0, 0, 0])
    assert bytes(_protocol.bump(0, True)) == bytes([0x04, 0, 0, 0, 0, 1])
    assert bytes(_protocol.bump(0, True, "restore")) == bytes([0x04, 0, 0, 0, 0, 3, 2, 0, 0, 0])
    f = _protocol.bump(5, False, "clone", bytes([7]) * 32, "web-3.example")
    assert bytes(f[:9]) == bytes([0x04, 5, 0, 0, 0, 2, 1, 32, 0])
    assert bytes(f[9:41]) == bytes([7]) * 32
    assert f[41] == 13 and bytes(f[42:]) == b"web-3.example"
    _protocol.wipe(f)
    assert bytes(f) == bytes(len(f))
