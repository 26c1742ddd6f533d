//! The container proof (`tests/containers/run.sh`): containers running
//! their own sysgenidd in a minimal image (no /etc, no /dev/fuse, no
//! CAP_SYS_ADMIN, read-only root) are checkpointed, restored and cloned by
//! CRIU under podman with crun, podman with runc, and runc on its own, with
//! `sysgenidctl criu-hook` as the action script: participants freeze before
//! the dump, each clone gets a new generation and its own epoch and thaws,
//! `--leave-running` thaws the original, a container without sysgenid is
//! not disturbed, and a stuck participant fails the checkpoint.
//!
//! Needs root (debootstrap of the development suite's criu, podman, crun
//! and runc into /var/cache/sysgenid-criu, namespaces). Outside CI it skips
//! visibly when not root or when `SYSGENID_SKIP_CONTAINERS=1`; with
//! `CI=true` it must run.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use sysgenid_tests::bin;

/// Writes past the test harness's capture, so the summary (with the
/// measured resume-to-page window) shows in CI logs.
fn show(text: &str) {
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
        let _ = tty.write_all(text.as_bytes());
    }
}

#[test]
fn criu_checkpoints_restores_and_clones_containers_running_sysgenidd() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let skip_asked = std::env::var("SYSGENID_SKIP_CONTAINERS").is_ok_and(|v| v == "1");
    if !in_ci && (skip_asked || !rustix::process::geteuid().is_root()) {
        show("SKIPPED container test (needs root; SYSGENID_SKIP_CONTAINERS=1 skips it); run tests/containers/run.sh\n");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/containers/run.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("SYSGENIDD", bin("sysgenidd"))
        .env("SYSGENIDCTL", bin("sysgenidctl"))
        .output()
        .expect("run tests/containers/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout
        .find("==== sysgenid container test summary")
        .map_or(&stdout[..], |i| &stdout[i..]);
    show(&format!("{summary}\n"));
    assert!(
        out.status.success(),
        "container test failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        summary.contains(", 0 failed"),
        "every scenario must pass:\n{stdout}"
    );
    // Every scenario ran, with both runtimes, and runc on its own.
    for line in [
        "crun clones: the clones' epochs differ",
        "runc clones: the clones' epochs differ",
        "crun leave-running: the original keeps its generation",
        "runc leave-running: the original keeps its generation",
        "crun in place: checkpoint and restore add one to the generation",
        "runc in place: checkpoint and restore add one to the generation",
        "crun without sysgenid: restore with the hook configured globally",
        "runc without sysgenid: restore with the hook configured globally",
        "crun stuck participant: the checkpoint fails in strict mode",
        "runc stuck participant: the checkpoint fails in strict mode",
        "crun stuck participant: with SYSGENID_CRIU_STRICT=0 the checkpoint goes ahead",
        "runc stuck participant: with SYSGENID_CRIU_STRICT=0 the checkpoint goes ahead",
        "crun start-up: the daemon says it runs in a container",
        "runc bundle: the restored container's watcher logs generation 1, kind restore",
        "crun clones: clone1-crun's watcher logs generation 1, kind restore",
        "runc clones: clone2-runc's watcher logs generation 1, kind restore",
    ] {
        assert!(
            stdout.contains(&format!("ok - {line}")),
            "missing: ok - {line}\n{stdout}"
        );
    }
    assert!(
        summary.contains("resume -> page shows the new generation")
            && !summary.contains("none measured"),
        "{summary}"
    );
}
