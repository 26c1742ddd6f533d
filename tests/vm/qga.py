"""A host-side client of the QEMU guest agent, for the lifecycle VM proof.

QEMU exposes the guest's `org.qemu.guest_agent.0` virtio-serial port as a
unix socket (`-chardev socket,...,server=on`); the agent in the guest reads
JSON commands from it and answers one JSON object per line. Before the
first command the client synchronizes with `guest-sync-delimited`: it sends
0xFF (which resets the agent's parser), then the sync with a fresh id, and
discards everything up to the agent's 0xFF marker and the answer carrying
that id, so answers to commands sent before the agent was listening cannot
be mistaken for ours.

Standard library only.
"""

import json
import random
import socket
import time


class QGAError(Exception):
    """The agent answered with an error object (`class`, `desc`)."""

    def __init__(self, command, error):
        self.command = command
        self.error_class = error.get("class", "?")
        self.desc = error.get("desc", "")
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QGATimeout(Exception):
    pass


class QGA:
    def __init__(self, path, timeout=60):
        self.path = path
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QGATimeout(f"agent socket {path} did not come up in {timeout}s")
                time.sleep(0.05)
        self.buf = b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _send(self, obj, reset=False):
        data = json.dumps(obj).encode() + b"\n"
        self.sock.sendall((b"\xff" if reset else b"") + data)

    def _recv(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise QGATimeout("no answer from the agent in time")
        self.sock.settimeout(min(left, 1.0))
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        if not chunk:
            raise QGATimeout("the agent's socket closed")
        self.buf += chunk
        return True

    def _line(self, deadline):
        """The next JSON object the agent sent (0xFF markers skipped), or
        None if nothing complete arrived within about a second."""
        while True:
            self.buf = self.buf.lstrip(b"\xff\r\n ")
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                line = line.replace(b"\xff", b"").strip()
                if not line:
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    continue  # a fragment from before a parser reset
            if not self._recv(deadline):
                return None

    def sync(self, timeout=120):
        """Waits until the agent answers (it starts after the guest boots):
        resends a `guest-sync-delimited` every 2 s until one is answered."""
        deadline = time.monotonic() + timeout
        while True:
            ident = random.randrange(1, 1 << 31)
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": ident}}, reset=True)
            resend = time.monotonic() + 2
            while time.monotonic() < resend:
                msg = self._line(deadline)
                if msg is not None and msg.get("return") == ident:
                    return time.monotonic()

    def cmd(self, name, timeout=60, **args):
        """Runs one command; its `return` value, or QGAError."""
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self._send(req)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._line(deadline)
            if msg is None:
                continue
            if "error" in msg:
                raise QGAError(name, msg["error"])
            if "return" in msg:
                return msg["return"]
