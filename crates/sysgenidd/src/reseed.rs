//! Renewing the kernel's random number generator before a change is
//! published, so that clones of one snapshot diverge before anyone learns
//! of the change.
//!
//! Why: without a VMGenID device the kernel reseeds its CRNG only on its
//! own schedule (at most once a minute after two minutes of uptime). Until
//! then every clone of a snapshot shares one `getrandom` stream, and so
//! would the epoch id the daemon draws and every program's "fresh" seed.
//! So for every change the kernel's own VM-fork reseed did not already
//! cover, the daemon first mixes the request's entropy into the pool
//! (`RNDADDENTROPY`, credited: only a privileged caller can send it) and
//! then forces a reseed (`RNDRESEEDCRNG`, Linux 4.17+). Both need
//! `CAP_SYS_ADMIN`; where the kernel refuses, the change still happens and
//! the outcome says why ([`explain`]).
//!
//! The two ioctls are the only `unsafe` here (rustix and libc do not
//! define these requests).

use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use sysgenid_proto::{Entropy, RngStatus};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`, Linux 4.17+.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// The device the ioctls go to (`/dev/random` accepts the same).
const URANDOM: &str = "/dev/urandom";

/// `--reseed`: when the daemon forces a reseed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// For every change the kernel's VM-fork reseed did not cover.
    Auto,
    /// For every change, also after the kernel's own VM-fork reseed.
    Always,
    /// Never (to measure its cost; clones may then share a random stream
    /// until the kernel reseeds by itself). Entropy that comes with a
    /// request is still mixed in.
    Never,
}

impl Policy {
    /// Parses `auto`, `always` or `never`.
    pub fn parse(value: &str) -> Option<Policy> {
        match value {
            "auto" => Some(Policy::Auto),
            "always" => Some(Policy::Always),
            "never" => Some(Policy::Never),
            _ => None,
        }
    }
}

/// What an errno from these ioctls (or from opening the device) means.
pub fn explain(errno: Errno) -> String {
    let why = match errno {
        Errno::PERM | Errno::ACCESS => {
            "the daemon lacks CAP_SYS_ADMIN (a container, or a daemon not run as root)"
        }
        Errno::INVAL | Errno::NOTTY => "the kernel is older than 4.17 (no RNDRESEEDCRNG)",
        Errno::NODATA => "the kernel's CRNG is not initialised yet",
        Errno::NOENT | Errno::NODEV | Errno::NXIO => "no /dev/urandom in this mount namespace",
        _ => "the kernel refused",
    };
    format!("{}: {why}", errno_name(errno))
}

fn errno_name(errno: Errno) -> String {
    let name = match errno {
        Errno::PERM => "EPERM",
        Errno::ACCESS => "EACCES",
        Errno::INVAL => "EINVAL",
        Errno::NOTTY => "ENOTTY",
        Errno::NODATA => "ENODATA",
        Errno::NOENT => "ENOENT",
        Errno::NODEV => "ENODEV",
        Errno::NXIO => "ENXIO",
        Errno::FAULT => "EFAULT",
        other => return format!("errno {}", other.raw_os_error()),
    };
    name.to_string()
}

/// The kernel's random number generator, as the daemon renews it.
pub struct KernelRng {
    policy: Policy,
    /// `/dev/urandom`, opened at start (a daemon that later loses access
    /// to `/dev` keeps it); the error if it could not be opened.
    device: Result<OwnedFd, Errno>,
}

impl KernelRng {
    /// Opens `/dev/urandom` for the ioctls; an error is kept and reported
    /// with every change.
    pub fn open(policy: Policy) -> KernelRng {
        let device = rustix::fs::open(URANDOM, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty());
        KernelRng { policy, device }
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Mixes `entropy` in (if any), then forces a reseed unless the
    /// kernel's own VM-fork reseed already covered this change
    /// (`kernel_reseeded`) and the policy is `auto`, or the policy is
    /// `never`. Never fails: the outcome says what was done and why not.
    pub fn renew(&self, entropy: Option<&Entropy>, kernel_reseeded: bool) -> RngStatus {
        let mut status = RngStatus::default();
        if let Some(entropy) = entropy {
            match self.add_entropy(entropy.bytes()) {
                Ok(()) => status.entropy_mixed = entropy.bytes().len() as u32,
                Err(e) => status.entropy_error = Some(explain(e)),
            }
        }
        let force = match self.policy {
            Policy::Always => true,
            Policy::Auto => !kernel_reseeded || entropy.is_some(),
            Policy::Never => false,
        };
        if force {
            match self.reseed() {
                Ok(()) => {
                    status.reseeded = true;
                    status.by = Some("sysgenidd".into());
                }
                Err(e) if kernel_reseeded => {
                    // The kernel's own reseed still stands.
                    status.reseeded = true;
                    status.by = Some("kernel".into());
                    status.not_reseeded_because =
                        Some(format!("the forced reseed failed: {}", explain(e)));
                }
                Err(e) => status.not_reseeded_because = Some(explain(e)),
            }
        } else if kernel_reseeded {
            status.reseeded = true;
            status.by = Some("kernel".into());
        } else {
            status.not_reseeded_because = Some("disabled (sysgenidd --reseed never)".into());
        }
        status
    }

    fn fd(&self) -> Result<libc::c_int, Errno> {
        self.device
            .as_ref()
            .map(|fd| fd.as_raw_fd())
            .map_err(|e| *e)
    }

    /// `RNDRESEEDCRNG`.
    fn reseed(&self) -> Result<(), Errno> {
        let fd = self.fd()?;
        // SAFETY: RNDRESEEDCRNG takes no argument and touches no user
        // memory; `fd` is an open descriptor this struct owns.
        let rc = unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
        }
    }

    /// `RNDADDENTROPY` with `bytes`, credited at 8 bits a byte.
    fn add_entropy(&self, bytes: &[u8]) -> Result<(), Errno> {
        let fd = self.fd()?;
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }:
        // two ints, then the bytes, in one buffer of u32 words (the
        // kernel reads it as ints and bytes; u32 gives the alignment).
        let words = 2 + bytes.len().div_ceil(4);
        let mut info = zeroize::Zeroizing::new(vec![0u32; words]);
        info[0] = (bytes.len() * 8) as u32;
        info[1] = bytes.len() as u32;
        for (i, chunk) in bytes.chunks(4).enumerate() {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            info[2 + i] = u32::from_ne_bytes(word);
        }
        // SAFETY: `info` is a live, aligned buffer laid out as the kernel's
        // `struct rand_pool_info` whose `buf_size` (info[1]) is no larger
        // than the bytes that follow the header; the kernel only reads it.
        let rc = unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanations_name_the_errno_and_the_cause() {
        assert!(explain(Errno::PERM).starts_with("EPERM: the daemon lacks CAP_SYS_ADMIN"));
        assert!(explain(Errno::INVAL).contains("older than 4.17"));
        assert!(explain(Errno::NOENT).contains("no /dev/urandom"));
    }

    #[test]
    fn policy_decides_who_reseeds() {
        let never = KernelRng::open(Policy::Never);
        let s = never.renew(None, false);
        assert!(!s.reseeded);
        assert!(s.not_reseeded_because.unwrap().contains("--reseed never"));
        let s = never.renew(None, true);
        assert!(s.reseeded);
        assert_eq!(s.by.as_deref(), Some("kernel"));
        // Without the device nothing can be done, and the outcome says so.
        let missing = KernelRng {
            policy: Policy::Auto,
            device: Err(Errno::NOENT),
        };
        let entropy = Entropy::new(vec![1; 32]).unwrap();
        let s = missing.renew(Some(&entropy), false);
        assert!(!s.reseeded);
        assert_eq!(s.entropy_mixed, 0);
        assert!(s.entropy_error.unwrap().starts_with("ENOENT"));
        assert!(s.not_reseeded_because.unwrap().starts_with("ENOENT"));
        let s = missing.renew(None, true);
        assert!(s.reseeded, "the kernel's own reseed stands");
        assert_eq!(s.by.as_deref(), Some("kernel"));
        assert!(
            s.not_reseeded_because.is_none(),
            "auto does not force after vmfork"
        );
    }
}
