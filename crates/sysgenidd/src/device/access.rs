//! Who may open `/dev/sysgenid` for writing (`--device-group NAME|none`).
//!
//! A writable handle is the seed's full watcher (read, acknowledge with
//! `write`, poll, ioctl, mmap), but it can also map the device page
//! writable, and a writer of that page could hide a restore from every
//! program mapping the device. So write opens go to a group the admin
//! trusts, as `/dev/kvm` does, and everyone else watches read-only.
//!
//! With a group, the check is the kernel's: the FUSE file is `root:GROUP
//! 0664` and the mount has `default_permissions`, so `open(2)` itself
//! applies the caller's full group list (supplementary groups included) at
//! the moment of the call, and a refused open never reaches the daemon.
//! With `none`, the file is `0666` without `default_permissions` and the
//! daemon grants write opens only to callers with `CAP_SYS_ADMIN` or
//! `CAP_CHECKPOINT_RESTORE`. Either way a forced update
//! (`SYSGENID_FORCE_GEN_UPDATE`) needs those capabilities.

/// The group created by the Debian package, used when it exists.
pub const DEFAULT_GROUP: &str = "sysgenid";

/// The write-open rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteAccess {
    /// Only callers with `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`,
    /// checked by the daemon.
    Privileged,
    /// Members of this group (and processes that override file
    /// permissions, such as root), checked by the kernel.
    Group {
        /// The group's name.
        name: String,
        /// Its id.
        gid: u32,
    },
}

/// Every form of "no such group" is `None` (`trust::lookup_group`): a
/// minimal system without `/etc/group` runs with `none`.
fn lookup(name: &str) -> Result<Option<u32>, String> {
    crate::trust::lookup_group(name)
}

impl WriteAccess {
    /// Resolves `--device-group`: `None` means [`DEFAULT_GROUP`] if it
    /// exists, else [`WriteAccess::Privileged`]; `none` is
    /// `Privileged`; a name must exist.
    pub fn resolve(flag: Option<&str>) -> Result<WriteAccess, String> {
        match flag {
            Some("none") => Ok(WriteAccess::Privileged),
            None => Ok(match lookup(DEFAULT_GROUP)? {
                Some(gid) => WriteAccess::Group {
                    name: DEFAULT_GROUP.into(),
                    gid,
                },
                None => WriteAccess::Privileged,
            }),
            Some(name) => match lookup(name)? {
                Some(gid) => Ok(WriteAccess::Group {
                    name: name.into(),
                    gid,
                }),
                None => Err(format!(
                    "--device-group {name}: no such group (create it with `groupadd --system {name}`, or pass --device-group none)"
                )),
            },
        }
    }

    /// Whether the kernel checks write opens (`default_permissions`).
    pub fn kernel_checked(&self) -> bool {
        matches!(self, WriteAccess::Group { .. })
    }

    /// The FUSE file's permission bits.
    pub fn file_mode(&self) -> u32 {
        match self {
            WriteAccess::Privileged => 0o666,
            WriteAccess::Group { .. } => 0o664,
        }
    }

    /// The FUSE file's group.
    pub fn file_gid(&self) -> u32 {
        match self {
            WriteAccess::Privileged => 0,
            WriteAccess::Group { gid, .. } => *gid,
        }
    }

    /// For the startup line and status.
    pub fn describe(&self) -> String {
        match self {
            WriteAccess::Privileged => {
                "write opens need CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE".into()
            }
            WriteAccess::Group { name, gid } => format!("write opens for group {name} (gid {gid})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_is_privileged_and_a_missing_group_is_an_error() {
        assert_eq!(
            WriteAccess::resolve(Some("none")),
            Ok(WriteAccess::Privileged)
        );
        let err = WriteAccess::resolve(Some("no-such-group-sysgenid-test")).unwrap_err();
        assert!(err.contains("no such group"), "{err}");
    }

    #[test]
    fn an_existing_group_is_checked_by_the_kernel() {
        // gid 0 exists everywhere.
        let root = nix::unistd::Group::from_gid(0.into()).unwrap().unwrap();
        let access = WriteAccess::resolve(Some(&root.name)).unwrap();
        assert_eq!(
            access,
            WriteAccess::Group {
                name: root.name.clone(),
                gid: 0
            }
        );
        assert!(access.kernel_checked());
        assert_eq!(access.file_mode(), 0o664);
        assert!(!WriteAccess::Privileged.kernel_checked());
    }
}
