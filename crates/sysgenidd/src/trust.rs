//! Who may hold the snapshot lifecycle (`--lifecycle-group NAME|none`), and
//! how group names become ids on systems that may have no group database.
//!
//! A freeze waits for its tracked participants, and the automatic thaw
//! after a restore waits for the tracked watchers to acknowledge. If any
//! local user could be one of those, any local user could fail every
//! freeze (register and never confirm) or keep a restored system frozen
//! until `--max-frozen-ms` (watch and never acknowledge). So only trusted
//! parties count there; everyone else is still told about freezes, thaws
//! and changes. Trusted, judged in the daemon's user namespace, is any of:
//! * uid 0, or the daemon's own uid (root in a container is trusted by
//!   that container's daemon, capabilities or not);
//! * a member of the lifecycle group (primary or supplementary);
//! * a process with `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE` (the bump
//!   capabilities; `peer::privileged`).
//!
//! The decision is the adapter's: the frontends ask [`TrustRule::trusts`]
//! when a tracked watcher or participant registers, and tell the pure core
//! only whether it counts for the lifecycle. The seed's barrier
//! (`wait-watchers`) is not affected: it counts every tracked watcher.
//! `docs/design.md` ("Who holds the lifecycle") has the why.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The group created by the Debian package, used when it exists.
pub const DEFAULT_GROUP: &str = "sysgenid";

/// Looks a group up by name. Every way `getgrnam_r` says "no such group"
/// means `None`: 0 with no entry, and the `ENOENT`, `ESRCH`, `EBADF` and
/// `EPERM` that NSS modules and a missing `/etc/group` report
/// (`getgrnam(3)`). Anything else is an error.
pub fn lookup_group(name: &str) -> Result<Option<u32>, String> {
    use nix::errno::Errno;
    match nix::unistd::Group::from_name(name) {
        Ok(group) => Ok(group.map(|g| g.gid.as_raw())),
        Err(Errno::ENOENT | Errno::ESRCH | Errno::EBADF | Errno::EPERM) => Ok(None),
        Err(e) => Err(format!("cannot look up group {name}: {e}")),
    }
}

/// Who is trusted with the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRule {
    /// The lifecycle group: (name, gid).
    group: Option<(String, u32)>,
    /// The daemon's effective uid.
    own_uid: u32,
}

/// The identity the kernel recorded for a peer.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Its pid in our pid namespace (0: unknown).
    pub pid: i32,
    /// Its uid, in our user namespace.
    pub uid: u32,
    /// Its primary gid, in our user namespace.
    pub gid: u32,
}

impl TrustRule {
    /// Resolves `--lifecycle-group`: `None` means [`DEFAULT_GROUP`] if it
    /// exists, else no group; `none` is no group; a name must exist.
    pub fn resolve(flag: Option<&str>) -> Result<TrustRule, String> {
        let group = match flag {
            Some("none") => None,
            None => lookup_group(DEFAULT_GROUP)?.map(|gid| (DEFAULT_GROUP.to_string(), gid)),
            Some(name) => match lookup_group(name)? {
                Some(gid) => Some((name.to_string(), gid)),
                None => {
                    return Err(format!(
                        "--lifecycle-group {name}: no such group (create it with `groupadd --system {name}`, or pass --lifecycle-group none)"
                    ))
                }
            },
        };
        Ok(TrustRule {
            group,
            own_uid: rustix::process::geteuid().as_raw(),
        })
    }

    /// Trusts uid 0 and the daemon's uid only (tests, and before start-up).
    pub fn owner_only() -> TrustRule {
        TrustRule {
            group: None,
            own_uid: rustix::process::geteuid().as_raw(),
        }
    }

    /// Whether `who` is trusted with the lifecycle. `groups` lists its
    /// supplementary groups, asked only when the group decides.
    pub fn trusts(&self, who: Identity, groups: impl FnOnce() -> Option<Vec<u32>>) -> bool {
        if who.uid == 0 || who.uid == self.own_uid {
            return true;
        }
        if let Some((_, gid)) = &self.group {
            if who.gid == *gid || groups().is_some_and(|g| g.contains(gid)) {
                return true;
            }
        }
        capable(who)
    }

    /// For the startup line.
    pub fn describe(&self) -> String {
        match &self.group {
            Some((name, gid)) => format!(
                "root, uid {}, the bump capabilities and group {name} (gid {gid})",
                self.own_uid
            ),
            None => format!("root, uid {} and the bump capabilities", self.own_uid),
        }
    }
}

/// Whether the process has the bump capabilities in our user namespace
/// now (`peer::privileged`, on a pidfd opened for it here).
fn capable(who: Identity) -> bool {
    if who.pid <= 0 {
        return false;
    }
    // A tracked watcher's registration: judged on the connecting process as
    // it is now, pinned by a pidfd (the identity check inside compares its
    // uids with the recorded one, so a reused pid of another user fails).
    let sender = crate::peer::device_caller(who.pid as u32, who.uid);
    crate::peer::privileged(Some(&sender)).is_ok()
}

/// The supplementary groups the kernel recorded for a socket's peer at
/// connect time (`SO_PEERGROUPS`), in our user namespace.
pub fn socket_groups(sock: BorrowedFd<'_>) -> Option<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, a
        // buffer of that size we own; the descriptor is valid for the call.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<u32>();
        if rc == 0 {
            groups.truncate(n);
            return Some(groups);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return None;
        }
        groups.resize(n.max(groups.len() * 2), 0);
    }
    None
}

/// The supplementary groups of process (or thread) `pid` now, from
/// `/proc/<pid>/status` (`Groups:`, in our user namespace).
pub fn process_groups(pid: i32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_group_is_no_group_and_none_is_none() {
        assert_eq!(lookup_group("no-such-group-sysgenid-test"), Ok(None));
        let rule = TrustRule::resolve(Some("none")).unwrap();
        assert_eq!(rule.group, None);
        let err = TrustRule::resolve(Some("no-such-group-sysgenid-test")).unwrap_err();
        assert!(err.contains("no such group"), "{err}");
    }

    #[test]
    fn root_the_own_uid_and_group_members_are_trusted_others_not() {
        let rule = TrustRule {
            group: Some(("g".into(), 4242)),
            own_uid: 1000,
        };
        let who = |uid, gid| Identity { pid: 0, uid, gid };
        assert!(rule.trusts(who(0, 0), || None));
        assert!(rule.trusts(who(1000, 1000), || None));
        assert!(rule.trusts(who(65534, 4242), || None), "primary group");
        assert!(rule.trusts(who(65534, 65534), || Some(vec![7, 4242])));
        assert!(!rule.trusts(who(65534, 65534), || Some(vec![7])));
        assert!(!rule.trusts(who(65534, 65534), || None));
        let no_group = TrustRule {
            group: None,
            own_uid: 1000,
        };
        assert!(!no_group.trusts(who(65534, 4242), || Some(vec![4242])));
    }
}
