"""The snapshot lifecycle (protocol 2) from Python: participants read
freeze, thaw and change events and confirm freezes; the orchestrator
freezes and thaws. Against the real daemon."""

import asyncio
import errno
import functools
import threading
import time

import pytest

import sysgenid
import sysgenid.aio
from sysgenid import Event

from conftest import NOBODY, needs_root, run_python, wait_until


def participant(daemon, **kw):
    return sysgenid.Watcher(runtime_dir=daemon.dir, lifecycle=True, **kw)


def next_event(w, limit=10.0):
    """The next event within ``limit`` seconds."""
    event = w.try_read_event()
    if event is not None:
        return event
    assert w.wait_readable(limit), "no event within %ss" % limit
    return w.read_event()


def start_freeze(daemon, timeout=None):
    """Starts a freeze in a thread; returns (thread, result list)."""
    result = []

    def run():
        try:
            result.append(sysgenid.freeze(timeout, runtime_dir=daemon.dir))
        except sysgenid.Error as e:
            result.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def test_a_freeze_waits_for_every_participant_to_confirm(daemon):
    p = participant(daemon)
    lazy = participant(daemon, untracked=True)
    plain = daemon.watcher(nonblocking=True)
    t, result = start_freeze(daemon)
    e = next_event(p)
    assert (e.kind, e.freeze, e.generation) == ("freeze", 1, 0)
    assert next_event(lazy) == Event("freeze", 1, 0)
    time.sleep(0.2)
    assert t.is_alive(), "waits for the tracked participant"
    s = daemon.status()
    assert (s["state"], s["pending"], s["participants"]) == ("freezing", 1, 2)
    p.confirm(1)
    t.join(10)
    assert result == [0], "the generation, once frozen"
    assert daemon.status()["state"] == "frozen"
    with pytest.raises(BlockingIOError):
        plain.read_event()  # a plain watcher never sees the lifecycle
    assert sysgenid.thaw(runtime_dir=daemon.dir) == 0
    assert next_event(p) == Event("thaw", 1, 0)
    assert next_event(lazy) == Event("thaw", 1, 0)
    assert daemon.status()["state"] == "running"
    assert p.try_read_event() is None, "each event once"
    for w in (p, lazy, plain):
        w.close()


def test_a_stuck_participant_aborts_the_freeze_and_everyone_thaws(daemon):
    p = participant(daemon)
    t, result = start_freeze(daemon, timeout=0.3)
    assert next_event(p).kind == "freeze"
    t.join(10)
    (err,) = result
    assert isinstance(err, sysgenid.FreezeAborted) and isinstance(err, TimeoutError)
    assert err.pending == 1 and err.errno == errno.ETIMEDOUT
    assert next_event(p) == Event("thaw", 1, 0)
    assert daemon.status()["state"] == "running"
    p.confirm(1)  # a freeze that already ended: accepted, nothing changes
    with pytest.raises(sysgenid.Refused) as e:
        p.confirm(9)
    assert e.value.errno == errno.EINVAL, "WrongFreeze: never asked for"


def test_a_participant_joining_while_frozen_is_told_at_once(daemon):
    assert sysgenid.freeze(runtime_dir=daemon.dir) == 0, "nobody to wait for"
    late = participant(daemon)
    assert next_event(late) == Event("freeze", 1, 0)
    s = daemon.status()
    assert (s["state"], s["pending"]) == ("frozen", 0), "counts as frozen already"
    late.confirm(1)
    assert sysgenid.freeze(runtime_dir=daemon.dir) == 0, "frozen already: Done at once"
    sysgenid.thaw(runtime_dir=daemon.dir)
    assert next_event(late).kind == "thaw"
    sysgenid.thaw(runtime_dir=daemon.dir)  # idempotent
    assert late.try_read_event() is None


def test_a_restore_while_frozen_is_a_change_then_a_thaw_after_the_acks(daemon):
    p = participant(daemon)
    plain = daemon.watcher()
    t, result = start_freeze(daemon)
    p.confirm(next_event(p).freeze)
    t.join(10)
    assert result == [0]
    assert daemon.bump() == 1  # a clone restored from the frozen snapshot
    assert next_event(p) == Event("change", 0, 1), "renew first"
    assert p.read_event() == Event("change", 0, 1), "reported until acknowledged"
    s = daemon.status()
    assert (s["state"], s["thaw_after_acks"]) == ("frozen", True)
    plain.ack(plain.read())
    assert daemon.status()["state"] == "frozen", "waits for the participant's ack"
    p.ack(1)
    assert next_event(p) == Event("thaw", 1, 1)
    assert wait_until(lambda: daemon.status()["state"] == "running")


def test_events_met_while_waiting_for_a_reply_are_kept_in_order(daemon):
    p = participant(daemon)
    t, result = start_freeze(daemon, timeout=5)
    assert wait_until(lambda: daemon.status()["state"] == "freezing")
    # The Freeze frame is queued ahead of this request's reply.
    assert p.status()["state"] == "freezing"
    assert p.try_read_event() == Event("freeze", 1, 0), "kept, then handed out"
    p.confirm(1)
    t.join(10)
    sysgenid.thaw(runtime_dir=daemon.dir)
    assert next_event(p).kind == "thaw"


def test_read_on_a_participant_returns_changes_only(daemon):
    p = participant(daemon)
    t, result = start_freeze(daemon, timeout=0.3)
    t.join(10)  # aborted: Freeze then Thaw queued for p
    daemon.bump()
    assert p.read() == 1, "freeze and thaw dropped, the change returned"
    p.ack(1)
    assert p.try_read() is None


def test_skip_stops_reporting_a_change_without_acknowledging_it(daemon):
    p = participant(daemon, nonblocking=True)
    daemon.bump()
    assert wait_until(lambda: p.try_read_event() == Event("change", 0, 1))
    p.skip(1)
    with pytest.raises(BlockingIOError):
        p.read_event()
    assert daemon.status()["outdated"] == 1, "still outdated"
    daemon.bump()
    assert wait_until(lambda: p.try_read_event() == Event("change", 0, 2))
    p.ack(2)


def test_confirm_on_a_plain_watcher_is_enotconn_and_sends_nothing(daemon):
    w = daemon.watcher()
    with pytest.raises(sysgenid.Refused) as e:
        w.confirm(1)
    assert e.value.errno == errno.ENOTCONN and "lifecycle=True" in str(e.value)
    daemon.bump()
    w.ack(w.read())  # the connection is intact


def test_a_second_freeze_while_one_is_in_progress_is_busy(daemon):
    p = participant(daemon)
    t, result = start_freeze(daemon, timeout=20)
    assert next_event(p).kind == "freeze"
    with pytest.raises(sysgenid.Refused) as e:
        sysgenid.freeze(0.1, runtime_dir=daemon.dir)
    assert e.value.errno == errno.EBUSY
    sysgenid.thaw(runtime_dir=daemon.dir)  # aborts the freeze in progress
    t.join(10)
    assert isinstance(result[0], sysgenid.FreezeAborted)
    assert next_event(p).kind == "thaw"


def test_a_participant_survives_a_daemon_restart(daemon):
    p = participant(daemon)
    daemon.kill9()
    daemon.start()
    daemon.bump()
    assert p.read_event() == Event("change", 0, 1)
    p.ack(1)
    daemon.wait_watchers_registered(1)
    assert daemon.status()["participants"] == 1, "reconnected as a participant"


@needs_root()
def test_unprivileged_freeze_and_thaw_are_refused(daemon):
    code = """
import sysgenid
for call in (sysgenid.freeze, sysgenid.thaw):
    try:
        call(runtime_dir=%r)
    except PermissionError as e:
        print("refused", e.errno)
w = sysgenid.Watcher(runtime_dir=%r, lifecycle=True)   # participating needs no privilege
print("participant", w.acked)
""" % (daemon.dir, daemon.dir)
    r = run_python(code, user=NOBODY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["refused 13", "refused 13", "participant 0"], r.stdout
    assert daemon.status()["state"] == "running"


def test_the_async_participant_reads_events_and_confirms(daemon):
    async def main():
        async with sysgenid.aio.AsyncWatcher(runtime_dir=daemon.dir, lifecycle=True) as p:
            loop = asyncio.get_running_loop()
            freeze = functools.partial(sysgenid.freeze, 5, runtime_dir=daemon.dir)
            freezing = loop.run_in_executor(None, freeze)
            event = await p.read_event()
            assert event.kind == "freeze"
            await p.confirm(event.freeze)
            return event, await freezing

    event, generation = asyncio.run(asyncio.wait_for(main(), 20))
    assert (event, generation) == (Event("freeze", 1, 0), 0)
    assert daemon.status()["state"] == "frozen"
    sysgenid.thaw(runtime_dir=daemon.dir)


def test_a_frozen_participant_is_told_to_thaw_when_the_daemon_restarts(daemon):
    p = participant(daemon)
    t, result = start_freeze(daemon)
    e = next_event(p)
    p.confirm(e.freeze)
    t.join(10)
    assert result == [0]
    daemon.kill9()  # the lifecycle state is not saved: the new daemon runs
    daemon.start()
    got = p.read_event()  # reconnects
    assert got == Event("thaw", 1, 0), "told to resume"
    p.confirm(1)  # a freeze of the previous daemon: accepted, nothing sent
    assert daemon.status()["state"] == "running"
    # The new daemon numbers its freezes afresh; the participant follows.
    t, result = start_freeze(daemon)
    e = next_event(p)
    assert (e.kind, e.freeze) == ("freeze", 1)
    p.confirm(1)
    t.join(10)
    assert result == [0]
    sysgenid.thaw(runtime_dir=daemon.dir)
    assert next_event(p).kind == "thaw"
