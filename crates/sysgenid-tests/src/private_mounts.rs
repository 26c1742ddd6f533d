//! A mount namespace private to the calling test thread, for the tests that
//! are about the daemon's defaults: they need the machine's shared paths
//! (`/etc/group`, `/run/sysgenid`) in a state of their own, and no other
//! process on the machine may see that state (a `sysgenid` group in the
//! real `/etc/group` would change every other daemon and test running
//! beside them; a daemon on the real `/run/sysgenid` would be the system
//! daemon's place).
//!
//! `unshare(CLONE_NEWNS)` moves only the calling thread (and what it starts
//! afterwards: threads, child processes) into the new namespace, so it
//! works the same under `cargo test` (one thread per test) and `cargo
//! nextest` (one process per test). Every mount made there dies with the
//! namespace, when the thread and its children are gone: nothing is left
//! mounted, whatever happens to the test. Needs root.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Proof that the calling thread is in a private mount namespace; made by
/// [`enter`].
pub struct PrivateMounts {
    /// Copies bind-mounted over files of the machine, by the file they
    /// hide (kept alive here).
    files: Vec<(PathBuf, tempfile::NamedTempFile)>,
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in a path")
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Moves the calling thread into a new mount namespace in which every
/// mount is private (no propagation back to the machine's). Panics when it
/// cannot (not root).
pub fn enter() -> PrivateMounts {
    // SAFETY: unshare(2) and mount(2) take only flags and NUL-terminated
    // strings that live across the calls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare(CLONE_NEWNS)");
        let root = cstr(Path::new("/"));
        check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "mount --make-rprivate /",
        );
    }
    PrivateMounts { files: Vec::new() }
}

impl PrivateMounts {
    /// Bind-mounts `source` over `target` (both must exist).
    pub fn bind(&mut self, source: &Path, target: &Path) {
        let (src, dst) = (cstr(source), cstr(target));
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        check(
            rc,
            &format!("bind {} over {}", source.display(), target.display()),
        );
    }

    /// Mounts an empty tmpfs on `target` (an existing directory).
    pub fn tmpfs(&mut self, target: &Path) {
        let (what, dst, opts) = (
            CString::new("tmpfs").unwrap(),
            cstr(target),
            CString::new("mode=0755").unwrap(),
        );
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                what.as_ptr(),
                dst.as_ptr(),
                what.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        check(rc, &format!("tmpfs on {}", target.display()));
    }

    /// Replaces `target` (a file) with a copy holding `contents`, seen only
    /// in this namespace. A copy bound there before is unmounted first: a
    /// bind stacked on it would make that copy a mount point, which could
    /// then not be removed.
    pub fn replace_file(&mut self, target: &Path, contents: &str) {
        if let Some(i) = self.files.iter().position(|(t, _)| t == target) {
            let dst = cstr(target);
            // SAFETY: umount(2) of a NUL-terminated path that outlives the call.
            check(
                unsafe { libc::umount(dst.as_ptr()) },
                "unmount the previous copy",
            );
            self.files.remove(i);
        }
        let mut copy = tempfile::Builder::new()
            .prefix("sysgenid-test-bind-")
            .tempfile()
            .expect("temporary file");
        copy.write_all(contents.as_bytes()).unwrap();
        let mode = std::fs::metadata(target)
            .map(|m| m.permissions())
            .expect("the file to replace");
        std::fs::set_permissions(copy.path(), mode).unwrap();
        self.bind(copy.path(), target);
        self.files.push((target.to_path_buf(), copy));
    }

    /// `/etc/group` as the machine has it, with group `name` given a gid
    /// no other group of the machine has (whether or not the machine has a
    /// group of that name); returns that gid. Only this thread and its
    /// children see it.
    pub fn with_group(&mut self, name: &str) -> u32 {
        let mut groups = groups_without(name);
        let taken: Vec<u32> = groups
            .lines()
            .filter_map(|l| l.split(':').nth(2)?.parse().ok())
            .collect();
        let gid = (20_000..60_000)
            .find(|g| !taken.contains(g))
            .expect("a free gid");
        groups.push_str(&format!("{name}:x:{gid}:\n"));
        self.replace_file(Path::new("/etc/group"), &groups);
        gid
    }

    /// `/etc/group` as the machine has it, without group `name`.
    pub fn without_group(&mut self, name: &str) {
        let groups = groups_without(name);
        self.replace_file(Path::new("/etc/group"), &groups);
    }
}

/// The lines of `/etc/group` (as this namespace sees it) but `name`'s.
fn groups_without(name: &str) -> String {
    std::fs::read_to_string("/etc/group")
        .expect("/etc/group")
        .lines()
        .filter(|l| l.split(':').next() != Some(name))
        .map(|l| format!("{l}\n"))
        .collect()
}
