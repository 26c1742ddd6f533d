//! The snapshot lifecycle under QEMU with the real QEMU guest agent
//! (`tests/vm/run.sh --lifecycle`): Debian's `qemu-guest-agent` in the guest
//! runs the shipped hook (`packaging/qemu-ga/sysgenid`) on
//! `guest-fsfreeze-freeze` / `guest-fsfreeze-thaw`, a guest participant
//! (`sysgenidctl watch --lifecycle`) freezes and thaws, the host saves the
//! frozen guest, and a clone restored from that save under a new vmgenid
//! GUID renews and runs again with no thaw sent. It also checks that a
//! participant that never confirms makes the agent's freeze fail through
//! `packaging/qemu-ga/fsfreeze-hook`, and is only logged by Debian's
//! stock dispatcher.
//!
//! Needs root (it installs QEMU, the agent's package and a Debian kernel
//! with apt when missing). Outside CI it skips visibly when not root or when
//! `SYSGENID_SKIP_VM=1`; with `CI=true` it must run.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use sysgenid_tests::{bin, without_sysgenid_env};

/// Writes to the real stderr, past the test harness's capture, so the
/// harness's timings show in CI logs even when the test passes.
fn show(text: &str) {
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
        let _ = tty.write_all(text.as_bytes());
    }
}

#[test]
fn qemu_guest_agent_freeze_quiesces_participants_and_a_frozen_clone_runs_again() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let skip_asked = std::env::var("SYSGENID_SKIP_VM").is_ok_and(|v| v == "1");
    if !in_ci && (skip_asked || !rustix::process::geteuid().is_root()) {
        show("SKIPPED vm lifecycle test (needs root; SYSGENID_SKIP_VM=1 skips it); run tests/vm/run.sh --lifecycle\n");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vm/run.sh");
    let out = without_sysgenid_env(&mut Command::new("bash"))
        .arg(&script)
        .arg("--lifecycle")
        .env("SYSGENIDD", bin("sysgenidd"))
        .env("SYSGENIDCTL", bin("sysgenidctl"))
        .output()
        .expect("run tests/vm/run.sh --lifecycle");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout
        .find("==== sysgenid lifecycle VM test summary")
        .map_or(&stdout[..], |i| &stdout[i..]);
    show(&format!("{summary}\n"));
    assert!(
        out.status.success(),
        "VM lifecycle test failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("vm-lifecycle: 4 passed, 0 failed"),
        "{stdout}"
    );
}
