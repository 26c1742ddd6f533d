"""Fixtures for the tests of the Python client against the real daemon.

``SYSGENIDD`` names the daemon binary (``python/run-tests.sh`` builds it
and sets it); every test gets its own daemon on a private runtime
directory, with no restore source and no device, so only the test bumps.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import sysgenid

NOBODY = 65534


def pytest_report_header(config):
    return "sysgenid package under test: %s; daemon: %s" % (
        sysgenid.__file__,
        os.environ.get("SYSGENIDD", "(SYSGENIDD not set)"),
    )


def wait_until(cond, limit=10.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


# Every flag whose default follows the machine, pinned: restore sources
# (auto), the device (/dev/sysgenid as root), its group (``sysgenid`` when
# that group exists), the hooks directory (/etc/sysgenid/hooks.d), who holds
# the lifecycle (also ``sysgenid`` when that group exists).
PINNED_FLAGS = ["--source", "none", "--device", "off", "--device-group", "none",
                "--hooks-dir", "off", "--lifecycle-group", "none"]

# What a daemon under test keeps of the caller's environment; anything else
# (SYSGENID_RUNTIME_DIR, SYSGENID_DEVICE, RUST_LOG, NOTIFY_SOCKET, ...)
# would change what it does.
KEPT_ENV = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ", "RUST_BACKTRACE")


def clean_env(**extra):
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    env.update(extra)
    return env


class Daemon:
    """A running ``sysgenidd`` on ``dir`` with ``PINNED_FLAGS`` (plus
    ``extra`` flags) in a clean environment."""

    def __init__(self, dir, user=None, extra=()):
        self.dir = dir
        self.user = user
        self.extra = list(extra)
        self.log = dir + ".log"
        self.proc = None
        self.start()

    def start(self):
        binary = os.environ.get("SYSGENIDD")
        if not binary or not os.path.exists(binary):
            pytest.fail("SYSGENIDD must name the sysgenidd binary (python/run-tests.sh sets it)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--runtime-dir", self.dir] + PINNED_FLAGS + self.extra,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=clean_env(RUST_LOG="debug"),
                user=self.user,
            )
        if not wait_until(self._answers):
            self.stop()
            with open(self.log) as f:
                pytest.fail("sysgenidd did not come up; log:\n" + f.read())

    def _answers(self):
        if self.proc.poll() is not None:
            return False
        try:
            sock = os.path.join(self.dir, "sysgenid.sock")
            page = os.path.join(self.dir, "generation")
            if not (os.path.exists(sock) and os.path.exists(page)):
                return False
            if self.user is None:
                sysgenid.Control(self.dir).close()
            return True
        except sysgenid.NotRunning:
            return False

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self):
        self.stop(signal.SIGKILL)

    def restart(self):
        self.stop()
        self.start()

    def control(self):
        return sysgenid.Control(self.dir)

    def remove(self):
        """Stops the daemon and removes its directory and log."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.remove(self.log)
        except OSError:
            pass

    def status(self):
        return sysgenid.status(runtime_dir=self.dir)

    def generation(self):
        return self.status()["generation"]

    def bump(self, min_generation=0):
        return sysgenid.trigger_update(min_generation, runtime_dir=self.dir)

    def watcher(self, **kw):
        return sysgenid.Watcher(runtime_dir=self.dir, **kw)

    def wait_watchers_registered(self, n):
        assert wait_until(lambda: self.status()["watchers"] == n), self.status()


def private_dir(owner=None):
    """A runtime directory other users can traverse."""
    d = tempfile.mkdtemp(prefix="sysgenid-pytest-")
    os.chmod(d, 0o755)
    if owner is not None:
        os.chown(d, owner, owner)
    return d


@pytest.fixture
def daemon():
    d = Daemon(private_dir())
    try:
        yield d
    finally:
        d.remove()


@pytest.fixture
def runtime_env(daemon, monkeypatch):
    """The daemon, reached through SYSGENID_RUNTIME_DIR (the default path
    of every API)."""
    monkeypatch.setenv("SYSGENID_RUNTIME_DIR", daemon.dir)
    return daemon


def needs_root():
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid to nobody, chown)")


def run_python(code, user=None, env=None, timeout=30):
    """Runs ``code`` in a new interpreter of this environment, optionally
    as another uid, in a clean environment unless ``env`` is given;
    returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", code],
        user=user,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )
