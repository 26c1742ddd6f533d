//! Whether the daemon runs in a container, and how it knows.
//!
//! In a container, no kernel restore signal applies: a container is
//! checkpointed and restored (or cloned) by CRIU, which the kernel does
//! not announce, and the kernel's own signals (`/dev/kmsg`, the vmclock
//! device, uevents) are the host's, normally out of the container's reach.
//! Restores come from CRIU's action script instead (`sysgenidctl
//! criu-hook`, `docs/containers.md`). So `--source auto` opens no kernel
//! source in a container and says why; an explicit `--source LIST` is
//! still obeyed.
//!
//! The evidence, in the order looked for: the `container` environment
//! variable (systemd's convention, set by podman, LXC, systemd-nspawn),
//! podman's and CRI-O's `/run/.containerenv`, Docker's `/.dockerenv`,
//! systemd's `/run/systemd/container`, and last a pid namespace other than
//! the kernel's initial one (runc or containerd with a bundle that sets
//! none of the above).

use std::path::Path;

/// The inode of the initial pid namespace's `/proc/self/ns/pid` link
/// (`PROC_PID_INIT_INO`, fixed by the kernel).
const INITIAL_PID_NS_INODE: u64 = 0xEFFF_FFFC;

/// How the daemon knows it runs in a container (for the log), or `None`.
pub fn detect() -> Option<String> {
    detect_with(
        |name| std::env::var(name).ok(),
        |path| Path::new(path).exists(),
        || {
            std::fs::metadata("/proc/self/ns/pid")
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        },
    )
}

fn detect_with(
    var: impl Fn(&str) -> Option<String>,
    exists: impl Fn(&str) -> bool,
    pid_ns_inode: impl Fn() -> Option<u64>,
) -> Option<String> {
    if let Some(kind) = var("container").filter(|v| !v.is_empty()) {
        return Some(format!("container={kind}"));
    }
    for (path, who) in [
        ("/run/.containerenv", "podman or CRI-O"),
        ("/.dockerenv", "Docker"),
        ("/run/systemd/container", "systemd's marker"),
    ] {
        if exists(path) {
            return Some(format!("{who}: {path}"));
        }
    }
    match pid_ns_inode() {
        Some(inode) if inode != INITIAL_PID_NS_INODE => {
            Some("a pid namespace other than the host's".to_string())
        }
        _ => None,
    }
}

/// The reason each kernel source is off under `--source auto` in a
/// container.
pub fn inactive_reason(evidence: &str) -> String {
    format!(
        "off in a container ({evidence}): no kernel restore signal applies; restores come from the CRIU action script"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_evidence_is_named() {
        let none = |_: &str| None;
        let nothing = |_: &str| false;
        assert_eq!(
            detect_with(|_| Some("podman".into()), nothing, || None).as_deref(),
            Some("container=podman")
        );
        assert_eq!(
            detect_with(none, |p| p == "/run/.containerenv", || None).as_deref(),
            Some("podman or CRI-O: /run/.containerenv")
        );
        assert_eq!(
            detect_with(none, |p| p == "/.dockerenv", || None).as_deref(),
            Some("Docker: /.dockerenv")
        );
        assert_eq!(
            detect_with(none, nothing, || Some(4026532000)).as_deref(),
            Some("a pid namespace other than the host's")
        );
        assert_eq!(
            detect_with(none, nothing, || Some(INITIAL_PID_NS_INODE)),
            None,
            "the host: initial pid namespace, no marker"
        );
        assert_eq!(detect_with(|_| Some(String::new()), nothing, || None), None);
    }
}
