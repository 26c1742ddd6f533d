"""trigger_update, status, wait_watchers without a watcher; the default
runtime directory; who is trusted."""

import errno
import json
import os
import shutil

import pytest

import sysgenid
from sysgenid import _trust

from conftest import NOBODY, Daemon, needs_root, private_dir, run_python


def test_trigger_update_returns_the_new_generation(runtime_env):
    assert sysgenid.trigger_update() == 1
    assert sysgenid.trigger_update(0) == 2
    assert sysgenid.trigger_update(min_generation=40) == 40
    assert sysgenid.trigger_update(3) == 41, "max(min, current + 1)"
    assert runtime_env.generation() == 41
    with pytest.raises(ValueError):
        sysgenid.trigger_update(-1)
    with pytest.raises(ValueError):
        sysgenid.trigger_update(2**32)
    assert runtime_env.generation() == 41, "a refused request changes nothing"


def test_trigger_update_carries_kind_entropy_and_hostname(runtime_env):
    assert sysgenid.trigger_update(kind="clone", entropy=os.urandom(64), hostname="web-3") == 1
    s = sysgenid.status()
    assert s["last_change_kind"] == "clone"
    if os.geteuid() == 0:
        assert s["last_change_rng"]["entropy_mixed"] == 64, s
        assert s["last_change_rng"]["reseeded"] is True, s
    with sysgenid.Control() as c:
        assert c.trigger_update(kind="restore") == 2
    assert sysgenid.status()["last_change_kind"] == "restore"
    w = sysgenid.Watcher()
    assert w.trigger_update(entropy=bytes(32)) == 3
    assert sysgenid.status()["last_change_kind"] == "unknown"
    w.close()
    # Bad input: ValueError before anything is sent; nothing changes.
    for kwargs in (
        {"entropy": bytes(31)},
        {"entropy": bytes(513)},
        {"kind": "fork"},
        {"hostname": "a_b"},
        {"hostname": "a" * 65},
        {"hostname": "-web"},
        {"hostname": ""},
    ):
        with pytest.raises(ValueError):
            sysgenid.trigger_update(**kwargs)
    assert runtime_env.generation() == 3


def test_status_is_the_daemons_report(runtime_env):
    w = sysgenid.Watcher()
    lazy = sysgenid.Watcher(untracked=True)
    sysgenid.trigger_update()
    s = sysgenid.status()
    assert s["generation"] == 1
    assert (s["watchers"], s["tracked"], s["outdated"], s["outdated_untracked"]) == (2, 1, 1, 1)
    assert len(s["epoch"]) == 32 and int(s["epoch"], 16) >= 0
    assert s["runtime_dir"] == runtime_env.dir
    assert s["last_change_sources"] == ["manual"]
    for key in ("uptime_ms", "last_change_unix_ms", "sources", "device", "daemon_version"):
        assert key in s
    json.dumps(s)
    w.close()
    lazy.close()


def test_module_wait_watchers_times_out_then_returns(runtime_env):
    w = sysgenid.Watcher()
    sysgenid.trigger_update()
    with pytest.raises(TimeoutError) as e:
        sysgenid.wait_watchers(0.2)
    assert e.value.outdated == 1
    w.ack(w.read())
    sysgenid.wait_watchers(5)
    with sysgenid.Control() as c:
        assert c.generation_at_connect == 1
        c.wait_watchers()
    w.close()


@needs_root()
def test_an_unprivileged_trigger_update_is_refused_and_changes_nothing(daemon):
    daemon.bump()
    code = """
import errno, sysgenid
try:
    sysgenid.trigger_update(runtime_dir=%r)
except PermissionError as e:
    assert isinstance(e, sysgenid.PermissionDenied) and e.errno == errno.EACCES, e
    print("refused:", e)
else:
    print("granted")
w = sysgenid.Watcher(runtime_dir=%r)        # watching needs no privilege
print("watcher at", w.acked)
""" % (daemon.dir, daemon.dir)
    r = run_python(code, user=NOBODY)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "watcher at 1" in r.stdout, r.stdout
    assert daemon.generation() == 1


def test_default_runtime_dir(monkeypatch):
    monkeypatch.delenv("SYSGENID_RUNTIME_DIR", raising=False)
    assert sysgenid.default_runtime_dir() == "/run/sysgenid"
    monkeypatch.setenv("SYSGENID_RUNTIME_DIR", "")
    assert sysgenid.default_runtime_dir() == "/run/sysgenid"
    monkeypatch.setenv("SYSGENID_RUNTIME_DIR", "/somewhere/else")
    assert sysgenid.default_runtime_dir() == "/somewhere/else"
    with pytest.raises(sysgenid.NotRunning) as e:
        sysgenid.status()
    assert "/somewhere/else/sysgenid.sock" in str(e.value)


@needs_root()
def test_a_non_root_user_defaults_to_the_system_directory_too():
    env = {k: v for k, v in os.environ.items() if k != "SYSGENID_RUNTIME_DIR"}
    env["XDG_RUNTIME_DIR"] = "/tmp"
    r = run_python("import sysgenid; print(sysgenid.default_runtime_dir())", user=NOBODY, env=env)
    assert r.stdout.strip() == "/run/sysgenid", r.stderr


@pytest.fixture
def nobodys_daemon():
    d = Daemon(private_dir(owner=NOBODY), user=NOBODY)
    try:
        yield d
    finally:
        d.remove()


@needs_root()
def test_a_daemon_run_by_another_user_is_not_trusted(nobodys_daemon):
    d = nobodys_daemon
    for connect in (
        lambda: sysgenid.Watcher(runtime_dir=d.dir),
        lambda: sysgenid.status(runtime_dir=d.dir),
        lambda: sysgenid.trigger_update(runtime_dir=d.dir),
    ):
        with pytest.raises(sysgenid.Untrusted) as e:
            connect()
        msg = str(e.value)
        assert os.path.join(d.dir, "sysgenid.sock") in msg and "uid 65534" in msg, msg
        assert e.value.owner == NOBODY and e.value.errno == errno.EPERM
    with pytest.raises(sysgenid.Untrusted) as e:
        sysgenid.Probe(d.dir)
    assert "owned by uid 65534" in str(e.value)
    assert os.path.join(d.dir, "generation") in str(e.value)
    # Its own user trusts it.
    r = run_python("import sysgenid; print(sysgenid.Probe(%r).generation, sysgenid.status("
                   "runtime_dir=%r)['generation'])" % (d.dir, d.dir), user=NOBODY)  # fmt: skip
    assert r.stdout.split() == ["0", "0"], r.stderr


def test_a_page_writable_by_others_is_not_trusted(daemon, tmp_path):
    page = tmp_path / "generation"
    shutil.copyfile(os.path.join(daemon.dir, "generation"), page)
    os.chmod(page, 0o666)
    with pytest.raises(sysgenid.Untrusted) as e:
        sysgenid.Probe(str(tmp_path))
    assert "writable by others (mode 0666)" in str(e.value)
    os.chmod(page, 0o444)
    assert sysgenid.Probe(str(tmp_path)).generation == 0


def test_trusted_uids_are_root_and_self():
    assert _trust.trusted_uid(0) and _trust.trusted_uid(os.geteuid())
    assert not _trust.trusted_uid(NOBODY) or os.geteuid() == NOBODY


def test_exhausting_the_counter_needs_to_be_asked_for(runtime_env):
    with pytest.raises(sysgenid.Overflow) as e:
        sysgenid.trigger_update(0xFFFFFFFF)
    assert e.value.errno == errno.EOVERFLOW and e.value.current == 0
    assert runtime_env.generation() == 0, "refused: nothing changed"
    assert sysgenid.trigger_update(0xFFFFFFFF, allow_exhaustion=True) == 0xFFFFFFFF
    with pytest.raises(sysgenid.Overflow) as e:
        sysgenid.trigger_update()
    assert e.value.current == 0xFFFFFFFF
    assert runtime_env.generation() == 0xFFFFFFFF
