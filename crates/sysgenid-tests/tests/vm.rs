//! The end-to-end proof under QEMU (`tests/vm/run.sh`): a restore of a real
//! guest under a new vmgenid GUID → the stock guest kernel's vmgenid driver
//! → `sysgenidd --source vmfork` in the guest → a watcher in the guest sees
//! the new generation; clones get different epoch ids; a restore under the
//! same GUID changes nothing; on the newest Debian kernel too, where the
//! vmclock source is proven on the guest's real `/dev/vmclock0`; and
//! clones of a guest without vmgenid diverge after a plain local bump
//! (different epochs, different getrandom: the daemon reseeds the kernel
//! CRNG), scenario (n).
//!
//! Needs root (it installs QEMU and a Debian kernel with apt when missing).
//! Outside CI it skips visibly when not root or when `SYSGENID_SKIP_VM=1`;
//! with `CI=true` it must run.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use sysgenid_tests::bin;

/// Writes to the real stderr, past the test harness's capture, so the
/// harness's timings show in CI logs even when the test passes.
fn show(text: &str) {
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
        let _ = tty.write_all(text.as_bytes());
    }
}

#[test]
fn restoring_a_qemu_guest_bumps_the_generation_inside_it() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let skip_asked = std::env::var("SYSGENID_SKIP_VM").is_ok_and(|v| v == "1");
    if !in_ci && (skip_asked || !rustix::process::geteuid().is_root()) {
        show("SKIPPED vm end-to-end test (needs root; SYSGENID_SKIP_VM=1 skips it); run tests/vm/run.sh\n");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vm/run.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("SYSGENIDD", bin("sysgenidd"))
        .env("SYSGENIDCTL", bin("sysgenidctl"))
        .env("SYSGENID_VM_RNG", bin("sysgenid-rng"))
        .output()
        .expect("run tests/vm/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout
        .find("==== sysgenid VM test summary")
        .map_or(&stdout[..], |i| &stdout[i..]);
    show(&format!("{summary}\n"));
    assert!(
        out.status.success(),
        "VM test failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    // Both lanes: the host suite's kernel under the host's QEMU, and the
    // development suite's newest kernel under its QEMU with a vmclock device.
    assert!(
        stdout.contains("vm-e2e lanes: stable=PASS newest=PASS"),
        "{stdout}"
    );
    // Stable: (a)-(d) and (n), clones without vmgenid; newest: also (v).
    assert!(stdout.contains("vm-e2e: 5 passed, 0 failed"), "{stdout}");
    assert!(stdout.contains("vm-e2e: 6 passed, 0 failed"), "{stdout}");
}
