"""The mapped page: one read for the generation, a consistent record, valid
across bumps and daemon restarts."""

import os

import pytest

import sysgenid


def test_generation_follows_every_bump(runtime_env):
    p = sysgenid.Probe()
    assert p.generation == 0
    for expected in range(1, 6):
        assert sysgenid.trigger_update() == expected
        assert p.generation == expected, "the page is published before the reply"
    assert sysgenid.trigger_update(1000) == 1000 and p.generation == 1000
    p.close()
    p.close()


def test_the_record_matches_the_status(runtime_env):
    with sysgenid.Probe() as p:
        r0 = p.record()
        assert r0.generation == 0
        sysgenid.trigger_update()
        r1 = p.record()
        s = sysgenid.status()
        assert r1.generation == 1 == s["generation"]
        assert r1.epoch.hex() == s["epoch"], "the epoch drawn at the change"
        assert r1.epoch != r0.epoch
        assert abs(r1.changed_unix_ns // 1_000_000 - s["last_change_unix_ms"]) <= 1


def test_the_mapping_survives_a_daemon_restart(daemon):
    p = sysgenid.Probe(daemon.dir)
    daemon.bump()
    daemon.kill9()
    daemon.start()
    assert p.generation == 1, "kept across the restart"
    daemon.bump()
    assert p.generation == 2, "the new daemon writes the same page"


def test_a_file_that_is_not_a_page_is_refused(tmp_path):
    (tmp_path / "generation").write_bytes(b"\0" * 4)
    with pytest.raises(sysgenid.ProtocolError, match="4 bytes, expected 4096"):
        sysgenid.Probe(str(tmp_path))
    (tmp_path / "generation").write_bytes(b"\0" * 4096)
    os.chmod(tmp_path / "generation", 0o444)
    with pytest.raises(sysgenid.ProtocolError, match="magic"):
        sysgenid.Probe(str(tmp_path))
    with pytest.raises(sysgenid.NotRunning):
        sysgenid.Probe(str(tmp_path / "missing"))
