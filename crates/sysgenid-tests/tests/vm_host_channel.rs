//! The host channel on a real virtio-vsock device
//! (`tests/vm/run.sh --host-channel`): a QEMU guest without vmgenid, its
//! vsock device served by `vhost-device-vsock`, whose hybrid vsock Unix
//! socket (the host side Firecracker and Cloud Hypervisor use) carries
//! every host command (`sysgenidctl --host-channel uds:PATH:1024`); a
//! guest-local connection through vsock loopback is refused; a frozen
//! guest is snapshotted and two clones restored from it thaw after the
//! host's `restored --clone`, with different epochs and getrandom output.
//! In both lanes: Debian 12's 6.1 under the host's QEMU, and the
//! development suite's 7.x kernel under its QEMU 11 run from a chroot.
//!
//! Needs root (QEMU, the kernel's modules, `cargo install
//! vhost-device-vsock` when missing). Outside CI it skips visibly when not
//! root or when `SYSGENID_SKIP_VM=1`; with `CI=true` it must run.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use sysgenid_tests::{bin, without_sysgenid_env};

/// Writes to the real stderr, past the test harness's capture.
fn show(text: &str) {
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
        let _ = tty.write_all(text.as_bytes());
    }
}

#[test]
fn the_host_drives_freeze_restore_and_clones_over_a_real_vsock_device() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let skip_asked = std::env::var("SYSGENID_SKIP_VM").is_ok_and(|v| v == "1");
    if !in_ci && (skip_asked || !rustix::process::geteuid().is_root()) {
        show("SKIPPED vm host-channel test (needs root; SYSGENID_SKIP_VM=1 skips it); run tests/vm/run.sh --host-channel\n");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vm/run.sh");
    // Without the caller's SYSGENID_* (SYSGENID_VM_LANES would drop a lane).
    let out = without_sysgenid_env(&mut Command::new("bash"))
        .arg(&script)
        .arg("--host-channel")
        .env("SYSGENIDD", bin("sysgenidd"))
        .env("SYSGENIDCTL", bin("sysgenidctl"))
        .output()
        .expect("run tests/vm/run.sh --host-channel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    show(&format!("{stdout}\n"));
    assert!(
        out.status.success(),
        "VM host-channel test failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    // Both lanes: the host suite's kernel under the host's QEMU, and the
    // development suite's newest kernel under its QEMU (from a chroot).
    assert!(
        stdout.contains("host-channel lanes: stable=PASS newest=PASS"),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .matches("host-channel vm: 5 passed, 0 failed")
            .count(),
        2,
        "{stdout}"
    );
}
