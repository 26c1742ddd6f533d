"""Every semantic of the seed's interface through sysgenid.Watcher, against
the real daemon."""

import errno
import select
import selectors
import subprocess
import sys
import threading
import time

import pytest

import sysgenid

from conftest import clean_env, run_python, wait_until


def readable(w, timeout=0.0):
    return bool(select.select([w], [], [], timeout)[0])


def test_a_blocking_read_in_another_process_is_woken_by_a_bump(daemon):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sysgenid; w = sysgenid.Watcher(runtime_dir=%r); print(w.read())" % daemon.dir],
        stdout=subprocess.PIPE, text=True, cwd="/", env=clean_env(),
    )  # fmt: skip
    daemon.wait_watchers_registered(1)
    assert daemon.bump() == 1
    out, _ = child.communicate(timeout=10)
    assert child.returncode == 0 and out.strip() == "1"


def test_a_blocking_read_returns_the_new_generation(daemon):
    w = daemon.watcher()
    assert w.acked == 0
    threading.Timer(0.2, daemon.bump).start()
    started = time.monotonic()
    assert w.read() == 1
    assert time.monotonic() - started >= 0.1, "read blocked until the bump"
    w.close()


def test_nonblocking_read_raises_blocking_io_error_until_a_change(daemon):
    w = daemon.watcher(nonblocking=True)
    with pytest.raises(BlockingIOError) as e:
        w.read()
    assert e.value.errno == errno.EAGAIN and isinstance(e.value, sysgenid.WouldBlock)
    assert w.try_read() is None
    daemon.bump()
    assert wait_until(lambda: w.try_read() == 1)
    assert w.read() == 1 and w.read() == 1, "returned again until acked"
    w.ack(1)
    with pytest.raises(BlockingIOError):
        w.read()


def test_a_wrong_ack_is_einval_and_changes_nothing(daemon):
    w = daemon.watcher(nonblocking=True)
    daemon.bump()
    daemon.bump()
    assert wait_until(lambda: w.try_read() == 2)
    for wrong in (1, 3, 0):
        with pytest.raises(OSError) as e:
            w.ack(wrong)
        assert e.value.errno == errno.EINVAL
        assert isinstance(e.value, sysgenid.WrongGeneration) and e.value.current == 2
    assert w.acked == 0
    assert daemon.status()["outdated"] == 1, "still outdated"
    assert readable(w)
    assert w.read() == 2
    w.ack(2)
    assert daemon.status()["outdated"] == 0
    with pytest.raises(ValueError):
        w.ack(-1)
    with pytest.raises(ValueError):
        w.ack(2**32)


def test_fileno_is_readable_exactly_while_outdated(daemon):
    w = daemon.watcher()
    assert not readable(w)
    daemon.bump()
    assert readable(w, 5)
    assert w.read() == 1
    assert readable(w), "reading does not consume the change"
    w.status()
    assert readable(w), "a request on an outdated watcher keeps it readable"
    w.ack(1)
    assert not readable(w, 0.2)
    daemon.bump()
    sel = selectors.DefaultSelector()
    sel.register(w, selectors.EVENT_READ)
    assert sel.select(5), "selectors sees it too"
    w.ack(w.read())
    assert not sel.select(0.2)
    sel.close()
    w.close()


def test_several_bumps_read_as_the_newest_only(daemon):
    w = daemon.watcher()
    for _ in range(5):
        daemon.bump()
    assert wait_until(lambda: w.try_read() == 5)
    assert w.read() == 5
    w.ack(5)
    assert not readable(w, 0.2)


def test_wait_watchers_waits_for_every_tracked_watcher(daemon):
    slow = daemon.watcher()
    lazy = daemon.watcher(untracked=True)
    me = daemon.watcher()
    daemon.bump()
    me.ack(me.read())
    with pytest.raises(TimeoutError) as e:
        me.wait_watchers(0.2)
    assert isinstance(e.value, sysgenid.TimedOut) and e.value.errno == errno.ETIMEDOUT
    assert e.value.outdated == 1, "the untracked watcher does not count"
    result = []
    t = threading.Thread(target=lambda: result.append(me.wait_watchers(10)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive(), "still waiting for the slow watcher"
    slow.ack(slow.read())
    t.join(10)
    assert result == [None]
    assert lazy.read() == 1, "the untracked watcher is still outdated"
    for w in (slow, lazy, me):
        w.close()


def test_wait_watchers_is_interrupted_when_this_watcher_is_outdated(daemon):
    me = daemon.watcher()
    daemon.bump()
    with pytest.raises(InterruptedError) as e:
        me.wait_watchers(5)
    assert isinstance(e.value, sysgenid.Interrupted) and e.value.generation == 1
    assert e.value.errno == errno.EINTR
    # ... and when it becomes outdated during the wait.
    other = daemon.watcher()
    me.ack(1)
    daemon.bump()
    me.ack(me.read())
    threading.Timer(0.3, daemon.bump).start()
    with pytest.raises(InterruptedError) as e:
        me.wait_watchers(10)
    assert e.value.generation == 3
    assert readable(me), "still readable after the interrupted wait"
    other.close()


def test_closing_unregisters_the_watcher(daemon):
    with daemon.watcher() as w:
        daemon.wait_watchers_registered(1)
        daemon.bump()
    daemon.wait_watchers_registered(0)
    assert daemon.status()["outdated"] == 0, "a closed outdated watcher no longer counts"
    w.close()  # idempotent


def test_trigger_update_through_a_watcher_leaves_it_outdated(daemon):
    w = daemon.watcher()
    assert w.trigger_update() == 1
    assert w.trigger_update(10) == 10
    assert readable(w, 5) and w.read() == 10
    assert w.status()["generation"] == 10
    w.ack(10)


def test_a_blocking_read_survives_a_daemon_restart(daemon):
    w = daemon.watcher()
    daemon.bump()
    w.ack(w.read())
    got = []
    t = threading.Thread(target=lambda: got.append(w.read()))
    t.start()
    daemon.kill9()
    time.sleep(0.1)
    daemon.start()
    daemon.wait_watchers_registered(1)
    assert t.is_alive(), "nothing new yet"
    daemon.bump()
    t.join(10)
    assert got == [2]
    w.ack(2)


def test_a_change_made_while_disconnected_is_delivered_after_reconnect(daemon):
    w = daemon.watcher()
    daemon.bump()
    w.ack(w.read())
    daemon.kill9()
    daemon.start()
    daemon.bump()  # the watcher's old connection is dead; it has not reconnected
    assert w.read() == 2, "reconnected with acked=1 and found generation 2"
    w.ack(2)
    assert daemon.status()["outdated"] == 0


def test_a_nonblocking_watcher_reconnects_once_without_waiting(daemon):
    w = daemon.watcher(nonblocking=True)
    daemon.stop()
    with pytest.raises(sysgenid.NotRunning):
        w.read()
    daemon.start()
    with pytest.raises(BlockingIOError):
        w.read()
    daemon.wait_watchers_registered(1)


def test_without_reconnect_a_restart_is_disconnected(daemon):
    w = daemon.watcher(reconnect=False)
    daemon.restart()
    with pytest.raises(sysgenid.Disconnected) as e:
        w.read()
    assert isinstance(e.value, ConnectionError)


def test_a_missing_daemon_is_not_running_with_the_path(tmp_path):
    with pytest.raises(sysgenid.NotRunning) as e:
        sysgenid.Watcher(runtime_dir=str(tmp_path))
    assert str(tmp_path) in str(e.value) and e.value.errno == errno.ENOENT
    assert isinstance(e.value, ConnectionError)
    r = run_python("import sysgenid; sysgenid.Watcher(runtime_dir=%r)" % str(tmp_path))
    assert "Is the daemon running?" in r.stderr
